"""OpenVINO GenAI's side of the speculative bench (where `make bench-openvino-setup` made
its venv): on a random checkpoint its plain, prompt-lookup and draft-model greedy tokens
are transformers' (and so ours), through the same module the bench runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2onnx.bench import openvino_speculative as ovs
from gpt2onnx.bench import prepare
from gpt2onnx.bench.speculative import OPENVINO_VENV
from gpt2onnx.runtime import GenerationParams, Model

PYTHON = prepare.peer_python(OPENVINO_VENV)


@pytest.mark.skipif(PYTHON is None, reason=f"needs {OPENVINO_VENV}: make bench-openvino-setup")
def test_openvino_modes_give_our_greedy_tokens(make_checkpoint, export_folder,
                                               tmp_path: Path) -> None:
    assert PYTHON is not None
    ckpt = make_checkpoint(seed=3, n_positions=256)
    target = ovs.export_ir(PYTHON, ckpt, tmp_path / "fp32", "fp32")
    draft = ovs.export_ir(PYTHON, ckpt, tmp_path / "int8", "int8")
    prompt, new = [464, 2068, 7586, 21831, 464, 2068], 24
    out = ovs.run(PYTHON, target, draft, prompt, new, [4], runs=1)
    ours = Model(export_folder(ckpt, layout="fused")).generate(
        prompt, GenerationParams(max_new_tokens=new, stop_on_eos=False)).token_ids
    assert set(out["modes"]) == {"plain", "prompt lookup k=4", "int8 draft k=4"}
    for mode, result in out["modes"].items():
        assert result["tokens"] == ours, mode  # speculation keeps greedy output (fp32 target)
        assert result["ms_per_token"] > 0
