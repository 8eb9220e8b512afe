"""The embedded trained model (models/pydoc-tiny): where trained weights matter.

With random weights argmax is close to a coin toss, so quantized agreement is only
meaningful here: every precision must pass its agreement thresholds on this model.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2onnx.runtime import GenerationParams, Model
from tests.conftest import EMBEDDED_MODEL

pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(),
                                reason="models/pydoc-tiny is not in this checkout")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
def test_every_precision_passes_agreement_on_trained_weights(precision, export_folder):
    folder = export_folder(EMBEDDED_MODEL, layout="fused", precision=precision)
    validation = json.loads((folder / "export_report.json").read_text())["validation"]
    checks = {c["name"]: c for c in validation["checks"]}
    # The agreement checks applied (the reference is confident), and held.
    assert not checks["top-1 agreement"]["skipped"], checks["top-1 agreement"]
    assert checks["top-1 agreement"]["passed"] and checks["greedy agreement (forced)"]["passed"]
    assert validation["metrics"]["reference_median_top1_probability"] > 0.05


def test_greedy_text_matches_pytorch(export_folder):
    folder = export_folder(EMBEDDED_MODEL, layout="fused", precision="fp32")
    model = Model(folder)
    ref = GPT2LMHeadModel.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()
    for prompt in ("Return the", "The following functions", "If the optional argument"):
        ids = model.encode(prompt)
        with torch.no_grad():
            hf = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                              dtype=torch.long), max_new_tokens=40, do_sample=False,
                              pad_token_id=model.manifest.eos_token_id)
        ours = model.generate(ids, max_new_tokens=40)
        expected = hf[0, len(ids):].tolist()
        assert ours.token_ids == expected[:len(ours.token_ids)]
        assert ours.text.strip(), "the trained model writes text"


def test_sampling_on_trained_weights_is_reproducible_and_varied(export_folder):
    model = Model(export_folder(EMBEDDED_MODEL, layout="fused", precision="int8"))
    params = GenerationParams(max_new_tokens=30, temperature=0.8, top_k=40, seed=0)
    first = model.generate("Return a", params)
    assert model.generate("Return a", params).text == first.text
    texts = {model.generate("Return a", params.with_(seed=s)).text for s in range(5)}
    assert len(texts) >= 4


def _int4_block_sizes(folder) -> set[int]:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return {a.i for n in graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "block_size"}


def test_int4_block_size_is_the_one_asked_for_and_trades_fidelity(export_folder):
    default = export_folder(EMBEDDED_MODEL, layout="fused", precision="int4")
    fine = export_folder(EMBEDDED_MODEL, layout="fused", precision="int4", int4_block_size=16)
    coarse = export_folder(EMBEDDED_MODEL, layout="fused", precision="int4",
                           int4_block_size=128)
    assert _int4_block_sizes(default) == {32}
    assert _int4_block_sizes(fine) == {16} and _int4_block_sizes(coarse) == {128}
    reports = {f: json.loads((f / "export_report.json").read_text()) for f in (fine, coarse)}
    assert reports[fine]["int4_block_size"] == 16
    assert reports[coarse]["int4_block_size"] == 128
    # Both pass validation against transformers; the finer blocks stay closer to it.
    for r in reports.values():
        assert r["validation"]["passed"], r["validation"]
    diff = {f: r["validation"]["metrics"]["logits_abs_diff"]["p90"] for f, r in reports.items()}
    assert diff[fine] < diff[coarse], diff
    ids = Model(coarse).encode("Return the")
    assert len(Model(coarse).generate(ids, max_new_tokens=8).token_ids) == 8
