"""CTranslate2 as a bench peer: the checkpoint converted by ``ct2-transformers-converter``
(fp32, or int8 weights), decoded greedily by ``ctranslate2.Generator`` in its own venv
(``tools/peers/setup_ct2.sh`` builds ``.venv-ct2``).

Standard library (and variants.py, itself light) only at the top: the parent (our venv)
imports ``ct2_folder`` from here without CTranslate2, and the worker in .venv-ct2 imports
``Ct2Engine`` with nothing of gpt2onnx installed (PYTHONPATH points at the checkout).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpt2onnx.bench.variants import DecodeRun, Engine

# Written next to the converted model: the precision the engine loads it at (the worker's
# spec names only the folder).
MARKER = "gpt2onnx-peer.json"

# The converter's --quantization (the weights on disk) and the compute type the Generator
# is loaded with, per bench precision. int8 is converted, not quantized at load
# (compute_type="int8" on an fp32 folder does the same arithmetic): the folder on disk is
# then the int8 one, so the bench's folder size and load time are CTranslate2's int8 ones.
# int8_float32: int8 GEMMs, fp32 everything else (the only int8 flavour its CPU build has
# besides plain "int8", which is the same thing on CPU).
QUANTIZATION = {"fp32": "float32", "int8": "int8"}
COMPUTE_TYPE = {"fp32": "float32", "int8": "int8_float32"}
# The GEMM backend per precision, CTranslate2's CT2_USE_MKL (read once, when the library
# first runs a GEMM; the engine sets it before importing ctranslate2, unless the caller
# already has). Unset, the PyPI wheel uses MKL only on a GenuineIntel CPU and oneDNN
# elsewhere, as on this bench's AMD EPYC. Measured there (2 cores, shared, gpt2 124M,
# batch 1, 32 tokens, ms/token): int8 oneDNN 18-22, int8 MKL 237-376 (MKL's integer
# GEMM off Intel); fp32 MKL 30-38 at 1 or 2 threads, fp32 oneDNN 34-44 at 1 thread and
# 51-72 at 2 under load (one quiet run: 23). MKL for fp32, oneDNN for int8.
USE_MKL = {"fp32": "1", "int8": "0"}


def ct2_folder(cache: Path, ckpt: Path, precision: str, python: Path) -> Path:
    """``ckpt`` converted by ``ct2-transformers-converter`` (run in CTranslate2's venv,
    ``python``) at ``precision`` (fp32 or int8), once; cached under ``cache``."""
    if precision not in QUANTIZATION:
        raise ValueError(f"CTranslate2 precision {precision!r}: use one of "
                         f"{', '.join(QUANTIZATION)}")
    out = cache / f"ct2-{ckpt.name}-{precision}"
    if (out / MARKER).exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cli = python.parent / "ct2-transformers-converter"
    cmd = [str(cli), "--model", str(ckpt), "--output_dir", str(tmp),
           "--quantization", QUANTIZATION[precision]]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0 or not (tmp / "model.bin").exists():
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise RuntimeError(f"CTranslate2 conversion failed ({' '.join(cmd)}); see above")
    (tmp / MARKER).write_text(json.dumps({"precision": precision}) + "\n")
    tmp.rename(out)
    return out


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


class Ct2Engine(Engine):
    """``ctranslate2.Generator``, greedy (top-1), token ids in and out.

    Every batch size, 1 included, decodes through ``generate_batch`` with a per-token
    callback whose row-0 calls timestamp each step, so batched step times are measured
    rather than evenly split. Not ``generate_tokens`` for batch 1: it is this same call
    run on a thread, feeding a queue, and stamping tokens as it yields them times the
    Python consumer, which receives them in bursts when it lags (steps of 0.003 ms on
    the tiny test model); the callback runs inside the decoding loop, at each step.
    """

    samples = True

    def __init__(self, folder: str, threads: int | None = None) -> None:
        marker = Path(folder) / MARKER
        if not marker.exists():
            raise ValueError(f"{folder} is not a bench CTranslate2 folder (no {MARKER}); "
                             "make it with peer_ct2.ct2_folder")
        self.precision: str = json.loads(marker.read_text())["precision"]
        # Before the import: the backend is chosen once per process, at its first GEMM.
        os.environ.setdefault("CT2_USE_MKL", USE_MKL[self.precision])
        import ctranslate2

        self.ct2 = ctranslate2
        self.compute_type = COMPUTE_TYPE[self.precision]
        # One thread per physical core, onnxruntime's default and so our engine's.
        self.threads = threads or _physical_cores()
        self.generator: Any = ctranslate2.Generator(folder, device="cpu",
                                                    compute_type=self.compute_type,
                                                    intra_threads=self.threads)
        # Freed before the interpreter's finalization: a Generator still alive then
        # aborts the process ("terminate called without an active exception", most exits
        # after a generate_tokens), which would fail a worker that decoded correctly.
        atexit.register(self.close)
        # The Generator takes token strings; the folder's vocabulary is in id order.
        self.vocab: list[str] = json.loads((Path(folder) / "vocabulary.json").read_text())

    def close(self) -> None:
        self.generator = None

    def _tokens(self, prompt: list[int]) -> list[str]:
        return [self.vocab[i] for i in prompt]

    def decode(self, prompt: list[int], new_tokens: int, batch: int,
               sampled: bool = False) -> DecodeRun:
        """Greedy, or ``sampled`` with ``config.SAMPLING`` (top-k off, seeded).
        ``end_token=[]``: no EOS stops (or is masked in) a random-weight model's run, as
        transformers' loop runs every step."""
        from gpt2onnx.bench.config import SAMPLING

        how: dict[str, Any] = {"sampling_topk": 1}
        if sampled:
            self.ct2.set_random_seed(SAMPLING["seed"])
            how = {"sampling_topk": 0, "sampling_topp": SAMPLING["top_p"],
                   "sampling_temperature": SAMPLING["temperature"]}
        start = self._tokens(prompt)
        stamps: list[float] = []
        tokens: list[int] = []

        def on_token(step: Any) -> bool:
            # Called from the decoding loop, every row of a step in turn: row 0's call
            # marks the step's end.
            if step.batch_id == 0:
                stamps.append(time.perf_counter())
                tokens.append(step.token_id)
            return False  # never stop early

        t0 = time.perf_counter()
        # include_prompt_in_result=False: the prompt goes through in one forward (the
        # prefill) instead of token by token, as generate_tokens does it.
        results = self.generator.generate_batch(
            [start] * batch, max_length=new_tokens, end_token=[],
            include_prompt_in_result=False, callback=on_token, **how)
        # The callback's ids are the result's; the check keeps a mismatch loud.
        assert results[0].sequences_ids[0] == tokens, "callback and result disagree"
        steps = [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]
        return DecodeRun((stamps[0] - t0) * 1e3, steps, tokens)

    def position_ms(self, prompt: list[int], positions: list[int], window: int
                    ) -> dict[int, float]:
        # A prefill of p tokens, then the window: the Generator keeps no cache between
        # calls, so this is the cheap way to the same per-position step cost.
        return self._position_ms_from_prefill(prompt, positions, window)

    def info(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"threads": self.threads, "ctranslate2": version("ctranslate2"),
                "compute_type": self.compute_type,
                "gemm_backend": "MKL" if os.environ.get("CT2_USE_MKL") == "1" else "oneDNN",
                "CT2_USE_MKL": os.environ.get("CT2_USE_MKL")}
