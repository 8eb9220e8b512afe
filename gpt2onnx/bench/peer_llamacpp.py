"""llama.cpp as a bench peer: the checkpoint as GGUF (f32, then q8_0 and q4_0 by
``llama-quantize``), decoded greedily by our ``gen_ids`` program against libllama
(``tools/peers/setup_llamacpp.sh`` builds it, its tools and ``.venv-llamacpp``).

The engine runs ``gen_ids`` once per decode call and reads the timings it prints (its
own steady clock around each ``llama_decode`` + sampling), so model loading is outside
the timed steps. Standard library only: the worker runs in our venv's interpreter; only
the GGUF converter needs ``.venv-llamacpp`` (transformers < 5).

Peak RSS: the worker reports its own VmHWM (worker.py), which does not include a child's;
``LlamaCppEngine.info`` adds ``child_peak_rss_mb``, the largest finished ``gen_ids``'s.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpt2onnx.bench.variants import LLAMACPP_VENV, DecodeRun, Engine

REPO = Path(__file__).resolve().parents[2]
PEERS = REPO / "bench" / ".cache" / "peers"
BUILD = PEERS / "llamacpp-build"
GEN_IDS = BUILD / "bin" / "gen_ids"
QUANTIZE = BUILD / "bin" / "llama-quantize"
SETUP = "tools/peers/setup_llamacpp.sh"
MARKER = "gpt2onnx-peer.json"
GGUF = "model.gguf"
# Bench precision -> the GGUF tensor type (f32 from the converter, the others quantized
# from that f32 file, as llama.cpp's own docs make them).
GGUF_TYPE = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
# The KV cache type per precision. f32 keeps the fp32 variant the same arithmetic as
# transformers' (its greedy tokens must agree); the quantized ones get llama.cpp's default
# f16 cache, what a llama.cpp user runs them with.
KV_TYPE = {"fp32": "f32", "int8": "f16", "int4": "f16"}


def build_version() -> str | None:
    """The llama-cpp-python sdist version the build came from (its stamp), or None."""
    stamp = BUILD / ".built"
    if not (stamp.exists() and GEN_IDS.exists() and QUANTIZE.exists()):
        return None
    return stamp.read_text().split()[0]


def _require_build() -> str:
    version = build_version()
    if version is None:
        raise RuntimeError(f"llama.cpp is not built ({GEN_IDS} missing): run {SETUP}")
    return version


def llama_source(version: str) -> Path:
    """The vendored llama.cpp tree of the sdist the build came from."""
    return PEERS / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}); see the output above")


def _staged_checkpoint(ckpt: Path, stage: Path) -> Path:
    """``ckpt`` as the converter reads it: its files linked, and a config.json that has
    ``n_ctx`` (the converter's GPT-2 class reads it; transformers 5 no longer writes it)."""
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.is_file() and f.name != "config.json":
            (stage / f.name).symlink_to(f.resolve())
    config = json.loads((ckpt / "config.json").read_text())
    config.setdefault("n_ctx", config["n_positions"])
    (stage / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return stage


def gguf_files(cache: Path, ckpt: Path) -> dict[str, Path]:
    """Bench precision -> a folder holding ``ckpt`` as ``model.gguf`` (fp32: f32, int8:
    q8_0, int4: q4_0) and a marker naming the precision; made once, cached under
    ``cache``. The converter runs in .venv-llamacpp, the quantizer is the build's."""
    version = _require_build()
    python = REPO / LLAMACPP_VENV / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"{LLAMACPP_VENV} is missing (the GGUF converter's venv): "
                           f"run {SETUP}")
    root = cache / f"llamacpp-{ckpt.name}-{version}"
    folders = {p: root / GGUF_TYPE[p] for p in GGUF_TYPE}
    f32 = folders["fp32"] / GGUF
    for precision, folder in folders.items():
        if (folder / MARKER).exists():
            continue
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if precision == "fp32":
            stage = _staged_checkpoint(ckpt, root / "hf-with-n_ctx")
            convert = llama_source(version) / "convert_hf_to_gguf.py"
            _run([str(python), str(convert), str(stage), "--outtype", "f32",
                  "--outfile", str(tmp / GGUF)], "GGUF conversion")
            shutil.rmtree(stage)
        else:
            _run([str(QUANTIZE), str(f32), str(tmp / GGUF), GGUF_TYPE[precision]],
                 f"llama-quantize to {GGUF_TYPE[precision]}")
        marker = {"precision": precision, "gguf_type": GGUF_TYPE[precision],
                  "llama_cpp_python": version}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        tmp.rename(folder)
    return folders


def _default_threads() -> int:
    """The cores this process may run on (llama.cpp's own default is its physical cores;
    onnxruntime's too, which these equal on the bench machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LlamaCppEngine(Engine):
    """``gen_ids`` on one GGUF folder: greedy, batch rows as separate sequences of one
    ``llama_batch``; every call is a fresh process (the model is mmapped each time).
    ``sampled``: temperature, top-p and a seeded draw (``config.SAMPLING``) instead."""

    samples = True

    def __init__(self, folder: str, threads: int | None = None) -> None:
        self.version = _require_build()
        marker = Path(folder) / MARKER
        if not marker.exists():
            raise ValueError(f"{folder} is not a bench GGUF folder (no {MARKER}); make it "
                             "with peer_llamacpp.gguf_files")
        facts = json.loads(marker.read_text())
        self.precision: str = facts["precision"]
        self.gguf_type: str = facts["gguf_type"]
        self.model = str(Path(folder) / GGUF)
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads}: use a positive number (or None: all cores)")
        self.threads = threads or _default_threads()
        self.kv = KV_TYPE[self.precision]
        if not Path(self.model).exists():
            raise ValueError(f"{folder} has no {GGUF}; make it with peer_llamacpp.gguf_files")
        # The last gen_ids report (its load time, the CPU features ggml was built for).
        self.last: dict[str, Any] = {}

    def _gen(self, prompt: list[int], new_tokens: int, batch: int, sampled: bool = False
             ) -> dict[str, Any]:
        cmd = [str(GEN_IDS), "-m", self.model, "-n", str(new_tokens), "-b", str(batch),
               "-t", str(self.threads), "--kv", self.kv]
        if sampled:
            from gpt2onnx.bench.config import SAMPLING

            cmd += ["--temp", str(SAMPLING["temperature"]), "--top-p", str(SAMPLING["top_p"]),
                    "--seed", str(SAMPLING["seed"])]
        done = subprocess.run(cmd, input=" ".join(map(str, prompt)), capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise RuntimeError(f"llama.cpp gen_ids: {lines[-1]}")
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return out

    def decode(self, prompt: list[int], new_tokens: int, batch: int,
               sampled: bool = False) -> DecodeRun:
        self.last = self._gen(prompt, new_tokens, batch, sampled)
        return DecodeRun(self.last["prefill_ms"], self.last["step_ms"], self.last["tokens"])

    def info(self) -> dict[str, Any]:
        if not self.last:
            # One token, the first time only: a broken build or file fails here, when the
            # worker reports ready, not mid-bench. Not in __init__: a cold start (worker.py
            # --cold, which never asks for info) would otherwise load the model twice.
            self.last = self._gen([0], 1, 1)
        # ru_maxrss of RUSAGE_CHILDREN: the largest waited-for child's peak, in kB on Linux.
        child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return {"threads": self.threads, "llama_cpp_python_sdist": self.version,
                "gguf_type": self.gguf_type, "kv_cache": self.kv,
                "flash_attn": self.last.get("flash_attn"), "load_ms": self.last.get("load_ms"),
                "system_info": self.last.get("llama_system_info"),
                "child_peak_rss_mb": child_kb * 1024 / 1e6}
