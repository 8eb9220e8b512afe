"""CPU fused graphs norm with Add + LayerNormalization, not SkipLayerNormalization, whose
onnxruntime CPU kernel is the slower form (bench/results/history.md, section 23)."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from gpt2onnx.contract import GRAPH_FILE


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_cpu_fused_graph_norms_without_skip_layer_norm(tiny_checkpoint, export_folder,
                                                       precision):
    """One LayerNormalization per sublayer plus ln_f, and onnxruntime's optimizer does not
    fuse them back into SkipLayerNormalization."""
    folder = export_folder(tiny_checkpoint, layout="fused", precision=precision)
    graph = onnx.load(str(folder / GRAPH_FILE), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "SkipLayerNormalization" not in ops
    assert ops.count("LayerNormalization") == 2 * 2 + 1  # TINY has 2 layers
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder.parent / "optimized.onnx")
    ort.InferenceSession(str(folder / GRAPH_FILE), options,
                         providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    assert "SkipLayerNormalization" not in {n.op_type for n in optimized.graph.node}
