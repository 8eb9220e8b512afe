"""OpenVINO GenAI as a bench peer (where `make bench-openvino-setup` made its venv): on a
tiny random checkpoint its fp32 greedy tokens are transformers', alone and batched,
through the bench's worker protocol, at the f32 precision hints it reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gpt2onnx.bench import prepare
from gpt2onnx.bench.measurements import worker_env
from gpt2onnx.bench.peer_openvino import MARKER, openvino_folder
from gpt2onnx.bench.variants import KIND_OPENVINO, OPENVINO_VENV, TorchLoopEngine

PYTHON = prepare.peer_python(OPENVINO_VENV)
PROMPT, NEW = [464, 2068, 7586, 21831, 18045, 625], 12


@pytest.mark.skipif(PYTHON is None, reason=f"needs {OPENVINO_VENV}: make bench-openvino-setup")
def test_openvino_fp32_greedy_is_transformers(make_checkpoint: Any, tmp_path: Path) -> None:
    assert PYTHON is not None
    ckpt = make_checkpoint(seed=5)
    folder = openvino_folder(tmp_path, ckpt, "fp32", PYTHON)
    assert (folder / MARKER).exists()
    spec = json.dumps({"kind": KIND_OPENVINO, "folder": str(folder)})
    commands = "".join(json.dumps(c) + "\n" for c in (
        {"op": "decode", "prompt": PROMPT, "new_tokens": NEW, "batch": 1},
        {"op": "decode", "prompt": PROMPT, "new_tokens": NEW, "batch": 2},
        {"op": "decode", "prompt": PROMPT, "new_tokens": NEW, "batch": 1, "sampled": True},
        {"op": "decode", "prompt": PROMPT, "new_tokens": NEW, "batch": 1, "sampled": True},
        {"op": "quit"}))
    done = subprocess.run([str(PYTHON), "-m", "gpt2onnx.bench.worker", spec],
                          input=commands, capture_output=True, text=True, timeout=300,
                          env=worker_env())
    assert done.returncode == 0, done.stderr[-2000:]
    ready, alone, batched, sampled, again = (json.loads(line)
                                             for line in done.stdout.splitlines())
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
