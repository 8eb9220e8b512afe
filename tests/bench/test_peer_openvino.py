"""OpenVINO GenAI as a bench peer (where `make bench-openvino-setup` made its venv): on a
tiny random checkpoint its fp32 greedy tokens are transformers', alone and batched,
through the bench's worker protocol, at the f32 precision hints it reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpt2onnx.bench import prepare
from gpt2onnx.bench.peer_openvino import MARKER, openvino_folder
from gpt2onnx.bench.variants import KIND_OPENVINO, OPENVINO_VENV, TorchLoopEngine
from tests.bench.helpers import decode, worker_replies

PYTHON = prepare.peer_python(OPENVINO_VENV)
PROMPT, NEW = [464, 2068, 7586, 21831, 18045, 625], 12


@pytest.mark.skipif(PYTHON is None, reason=f"needs {OPENVINO_VENV}: make bench-openvino-setup")
def test_openvino_fp32_greedy_is_transformers(make_checkpoint: Any, tmp_path: Path) -> None:
    assert PYTHON is not None
    ckpt = make_checkpoint(seed=5)
    folder = openvino_folder(tmp_path, ckpt, "fp32", PYTHON)
    assert (folder / MARKER).exists()
    ready, alone, batched, sampled, again = worker_replies(
        PYTHON, KIND_OPENVINO, folder,
        [decode(PROMPT, NEW), decode(PROMPT, NEW, 2), decode(PROMPT, NEW, sampled=True),
         decode(PROMPT, NEW, sampled=True)])
    # Seeded sampling: the same tokens twice, a full run of them.
    assert ready["info"]["samples"] and sampled["tokens"] == again["tokens"]
    assert len(sampled["tokens"]) == NEW
    # f32 asked for and used: the plugin's default here would be bf16 with an f16 cache.
    assert ready["info"]["hints_used"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert ready["info"]["hints_used"]["KV_CACHE_PRECISION"] == "f32"
    reference = TorchLoopEngine(str(ckpt), cached=True).decode(PROMPT, NEW, 1).tokens
    for run in (alone, batched):
        assert run["tokens"] == reference
        assert len(run["step_ms"]) == NEW - 1
        assert run["prefill_ms"] > 0 and min(run["step_ms"]) > 0


def test_openvino_folder_names_a_bad_precision(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'fp16'.*fp32, int8, int4"):
        openvino_folder(tmp_path, tmp_path, "fp16", tmp_path / "python")
