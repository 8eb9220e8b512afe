"""The full-size gpt2 architecture (124M, random weights: no hub here), every layout and
precision, validated against transformers. Slow: `make test-slow`."""

from __future__ import annotations

import json

import pytest

from tests.conftest import GPT2_SMALL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpt2_checkpoint(make_checkpoint):
    return make_checkpoint(**GPT2_SMALL)


@pytest.mark.parametrize(("layout", "precision"), [
    ("standard", "fp32"), ("fused", "fp32"), ("fused", "fp16"), ("fused", "int8"),
    ("fused", "int4"),
])
def test_gpt2_architecture_exports_and_validates(layout, precision, gpt2_checkpoint,
                                                 export_folder):
    folder = export_folder(gpt2_checkpoint, layout=layout, precision=precision, max_length=256)
    report = json.loads((folder / "export_report.json").read_text())
    assert report["validation"]["passed"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["n_layer"], manifest["n_head"], manifest["head_dim"]) == (12, 12, 64)
    assert manifest["precision"] == precision
