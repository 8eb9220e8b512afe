"""Graphs past protobuf's 2 GB limit (gpt2-xl) keep weights in model.onnx.data; the
runtime loads such a folder like any other. The limit is lowered here to test it small."""

from __future__ import annotations

import json

from gpt2onnx.export import folder as model_folder
from gpt2onnx.export.api import ExportOptions, export_model
from gpt2onnx.runtime import Model


def test_external_data_folder_round_trips(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(model_folder, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "big"
    export_model(tiny_checkpoint, out, ExportOptions(layout="fused"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert "model.onnx.data" in manifest["files"]
    assert (out / "model.onnx").stat().st_size < 200_000  # the graph alone, weights outside
    assert (out / "model.onnx.data").stat().st_size > 10_000_000
    assert len(Model(out).generate("Hello", max_new_tokens=3).token_ids) == 3
