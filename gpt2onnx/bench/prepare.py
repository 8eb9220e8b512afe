"""The models the bench runs: a checkpoint, our exports of it, and optimum's export.

Everything lands in a cache folder (git-ignored ``bench/.cache`` by default), keyed by
the architecture and options, so a second run starts measuring at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "tests" / "data" / "gpt2-tokenizer"
OPTIMUM_VENV = REPO / ".venv-optimum"


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def real_gpt2(arch: dict[str, int]) -> str | None:
    """The real ``gpt2`` checkpoint if it is already on this machine (never downloaded)."""
    from transformers import GPT2Config

    if arch.get("n_layer") != 12 or arch.get("n_embd") != 768:
        return None
    try:
        GPT2Config.from_pretrained("gpt2", local_files_only=True)
    except OSError:
        return None
    from huggingface_hub import snapshot_download

    return snapshot_download("gpt2", local_files_only=True)


def checkpoint(cache: Path, arch: dict[str, int], seed: int = 0) -> tuple[Path, str]:
    """A GPT-2 checkpoint folder and what it is: the real gpt2 when it is on disk,
    otherwise random weights (fixed seed) from ``arch`` with the real GPT-2 tokenizer."""
    real = real_gpt2(arch)
    if real is not None:
        return Path(real), "gpt2 (real weights)"
    folder = cache / f"ckpt-{_key([arch, seed])}"
    what = f"random weights, GPT2Config({', '.join(f'{k}={v}' for k, v in arch.items())})"
    if (folder / "config.json").exists():
        return folder, what
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    GPT2LMHeadModel(GPT2Config(**arch)).eval().save_pretrained(tmp)
    for f in TOKENIZER_DIR.iterdir():
        if f.name != "README.md":
            shutil.copy(f, tmp / f.name)
    tmp.rename(folder)
    return folder, what


# The instruction sets that decide which kernels run: the same code ran 1.3-1.7x apart on
# hosts with and without AVX-512 (OpenVINO computes in bf16 where avx512_bf16 exists).
SPEED_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16",
               "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """Which of ``SPEED_FLAGS`` this CPU has (empty where /proc/cpuinfo is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SPEED_FLAGS if f in have]
    except OSError:
        pass
    return []


@functools.cache
def exporter_digest() -> str:
    """A digest of the exporter's source, so that a changed exporter re-exports the
    bench's folders instead of timing graphs an older exporter wrote."""
    h = hashlib.sha256()
    for f in sorted((REPO / "gpt2onnx" / "export").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:10]


def our_export(cache: Path, ckpt: Path, layout: str, precision: str,
               provider: str = "cpu", int4_block_size: int | None = None) -> Path:
    """Our model folder for (layout, precision, provider[, int4 block size]); exported
    once and reused."""
    from gpt2onnx.export.api import ExportOptions, export_model

    block = f"-b{int4_block_size}" if int4_block_size else ""
    out = cache / (f"ours-{ckpt.name}-{layout}-{precision}{block}-{provider}-"
                   f"{exporter_digest()}")
    if not (out / "manifest.json").exists():
        # Validation against PyTorch is the exporter's test suite's job; the bench checks
        # instead that greedy tokens agree with the PyTorch variants on its own prompt.
        export_model(ckpt, out, ExportOptions(layout=layout, precision=precision,
                                              provider=provider, validate=False,
                                              int4_block_size=int4_block_size))
    return out


def optimum_python() -> Path | None:
    """The optimum venv's interpreter (``make bench-setup`` builds it), if present."""
    return peer_python(OPTIMUM_VENV.name)


def peer_python(venv: str) -> Path | None:
    """A peer venv's interpreter (``make bench-setup`` builds them), if present."""
    python = REPO / venv / "bin" / "python"
    return python if python.exists() else None


def genai_folder(cache: Path, ckpt: Path) -> Path:
    """Our standard fp32 folder, with the genai_config.json onnxruntime-genai reads (a
    cached export older than that file is exported again)."""
    from gpt2onnx.export.genai_config import GENAI_CONFIG_FILE

    folder = our_export(cache, ckpt, "standard", "fp32")
    if not (folder / GENAI_CONFIG_FILE).exists():
        from gpt2onnx.export.api import ExportOptions, export_model

        export_model(ckpt, folder, ExportOptions(layout="standard", validate=False))
    return folder


def optimum_export(cache: Path, ckpt: Path, python: Path) -> Path:
    """optimum-cli's own export (text-generation-with-past), run inside its venv."""
    out = cache / f"optimum-{ckpt.name}"
    if (out / "model.onnx").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [str(python), "-m", "optimum.exporters.onnx", "--model", str(ckpt),
           "--task", "text-generation-with-past", str(tmp)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0 or not (tmp / "model.onnx").exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"optimum export failed ({' '.join(cmd)}); see the output above")
    tmp.rename(out)
    return out


def folder_mb(folder: Path, pattern: str = "*") -> float:
    """Size on disk of a model folder's files (MB = 1e6 bytes)."""
    return sum(f.stat().st_size for f in folder.glob(pattern) if f.is_file()) / 1e6
