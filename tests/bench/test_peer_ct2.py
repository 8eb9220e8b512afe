"""CTranslate2 as a bench peer (where tools/peers/setup_ct2.sh made .venv-ct2): on a tiny
random checkpoint its fp32 greedy tokens are transformers', alone and batched, through
the bench's worker protocol; the int8 folder converts and decodes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpt2onnx.bench import prepare
from gpt2onnx.bench.peer_ct2 import MARKER, ct2_folder
from gpt2onnx.bench.variants import CT2_VENV, KIND_CT2, TorchLoopEngine
from tests.bench.helpers import decode, worker_replies

PYTHON = prepare.peer_python(CT2_VENV)
requires_ct2 = pytest.mark.skipif(PYTHON is None,
                                  reason=f"needs {CT2_VENV}: tools/peers/setup_ct2.sh")
PROMPT, NEW = [464, 2068, 7586, 21831, 18045, 625], 12


def run_worker(folder: Path, batches: tuple[int, ...], sampled: int = 0
               ) -> list[dict[str, Any]]:
    """The bench worker in .venv-ct2: its ready line, then one decode per batch size,
    then ``sampled`` seeded sampled decodes at batch 1."""
    assert PYTHON is not None
    return worker_replies(PYTHON, KIND_CT2, folder,
                          [*(decode(PROMPT, NEW, b) for b in batches),
                           *(decode(PROMPT, NEW, sampled=True) for _ in range(sampled))])


@requires_ct2
def test_ct2_fp32_greedy_is_transformers(make_checkpoint: Any, tmp_path: Path) -> None:
    ckpt = make_checkpoint(seed=5)
    folder = ct2_folder(tmp_path, ckpt, "fp32", PYTHON)
    assert (folder / MARKER).exists() and ct2_folder(tmp_path, ckpt, "fp32", PYTHON) == folder
    ready, alone, batched, sampled, again = run_worker(folder, (1, 2), sampled=2)
    assert ready["ok"] and ready["info"]["compute_type"] == "float32"
    # Sampled runs take all their steps (ctranslate2.set_random_seed does not make two
    # runs of one process repeat: its generator threads seed their own RNGs).
    assert ready["info"]["samples"] and len(sampled["tokens"]) == len(again["tokens"]) == NEW
    assert sampled["tokens"] != alone["tokens"] or again["tokens"] != alone["tokens"]
    assert ready["info"]["gemm_backend"] == "MKL"
    reference = TorchLoopEngine(str(ckpt), cached=True).decode(PROMPT, NEW, 1).tokens
    for run in (alone, batched):
        assert run["tokens"] == reference
        assert len(run["step_ms"]) == NEW - 1
        assert run["prefill_ms"] > 0 and min(run["step_ms"]) > 0


@requires_ct2
def test_ct2_int8_converts_and_decodes(make_checkpoint: Any, tmp_path: Path) -> None:
    folder = ct2_folder(tmp_path, make_checkpoint(seed=5), "int8", PYTHON)
    ready, alone = run_worker(folder, (1,))
    assert ready["info"]["compute_type"] == "int8_float32"
    assert ready["info"]["gemm_backend"] == "oneDNN"
    assert len(alone["tokens"]) == NEW and len(alone["step_ms"]) == NEW - 1


def test_ct2_folder_names_a_bad_precision(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'fp16'.*fp32, int8"):
        ct2_folder(tmp_path, tmp_path, "fp16", tmp_path / "python")
