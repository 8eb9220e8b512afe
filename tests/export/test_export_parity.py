"""Exported graphs against transformers' GPT2LMHeadModel, config field by config field.

export_model validates by default (prompt step, decode steps and 32 greedy tokens against
the PyTorch model) and raises ValidationError on a miss, so each export here is a parity
test; the report's numbers are checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2onnx.contract import GRAPH_FILE, REPORT_FILE, cache_names

# Each config changes the math in one way the graph must reproduce.
CONFIGS = {
    "default": {},
    "untied_head": {"tie_word_embeddings": False},
    "inverse_layer_idx": {"scale_attn_by_inverse_layer_idx": True},
    "no_attn_scale": {"scale_attn_weights": False},
    "upcast_attn": {"reorder_and_upcast_attn": True},
    "erf_gelu_n_inner": {"activation_function": "gelu", "n_inner": 96},
    "relu": {"activation_function": "relu", "layer_norm_epsilon": 1e-3},
    "silu_3_layers": {"activation_function": "silu", "n_layer": 3, "n_head": 2},
    "quick_gelu": {"activation_function": "quick_gelu"},
}


def _report(folder: Path) -> dict:
    return json.loads((folder / REPORT_FILE).read_text())


@pytest.mark.parametrize("layout", ["standard", "fused"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_matches_transformers(name, layout, make_checkpoint, export_folder):
    folder = export_folder(make_checkpoint(seed=1, **CONFIGS[name]), layout=layout)
    validation = _report(folder)["validation"]
    assert validation["passed"], validation
    checks = {c["name"]: c for c in validation["checks"]}
    assert checks["logits max|diff|/range"]["value"] <= 1e-4
    assert checks["top-1 agreement"]["value"] == 1.0
    assert checks["greedy tokens equal (of 32)"]["value"] == 32


def test_standard_graph_all_positions_with_left_padding(tiny_checkpoint, tiny_standard):
    """The standard graph's logits for *every* real position match, with a padded row."""
    ref_model = GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    session = ort.InferenceSession(str(tiny_standard / GRAPH_FILE),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, size=(2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :4] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for past, _ in cache_names(2):
        feed[past] = np.zeros((2, 4, 0, 16), np.float32)
    logits, *presents = session.run(None, feed)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos), use_cache=True)
    real = mask.astype(bool)
    assert np.abs(logits - ref.logits.numpy())[real].max() < 1e-4
    assert presents[0].shape == (2, 4, 9, 16)


def test_tied_embedding_is_stored_once(tiny_standard, tiny_fused):
    for folder in (tiny_standard, tiny_fused):
        model = onnx.load(str(folder / GRAPH_FILE), load_external_data=False)
        vocab_sized = [t.name for t in model.graph.initializer if 50257 in t.dims]
        assert vocab_sized == ["transformer.wte.weight"], vocab_sized


def test_manifest_describes_the_folder(tiny_fused):
    manifest = json.loads((tiny_fused / "manifest.json").read_text())
    assert manifest["layout"] == "fused"
    assert manifest["n_layer"] == 2 and manifest["n_head"] == 4 and manifest["head_dim"] == 16
    assert manifest["vocab_size"] == 50257 and manifest["context_length"] == 128
    assert manifest["max_length"] == 128 and manifest["cache_dtype"] == "float32"
    assert manifest["eos_token_id"] == 50256
    assert set(manifest["files"]) >= {"model.onnx", "tokenizer.json"}
    assert "past_key_values.1.value" in manifest["inputs"]
    assert "present.1.value" in manifest["outputs"]
