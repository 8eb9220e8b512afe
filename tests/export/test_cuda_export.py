"""`--provider cuda` exports validate here, where there is no GPU: the graph's numbers are
checked on the CPU kernels (fused fp16 and int4 have them), and the report says so."""

from __future__ import annotations

import json

import pytest

from gpt2onnx.errors import ProviderUnavailableError
from gpt2onnx.runtime import Model


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_cuda_folder_validates_on_the_cpu_kernels(tiny_checkpoint, export_folder, precision):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the folder validates on the GPU")
    folder = export_folder(tiny_checkpoint, layout="fused", precision=precision,
                           provider="cuda")
    report = json.loads((folder / "export_report.json").read_text())
    validation = report["validation"]
    assert validation["passed"]
    assert validation["validated_on"].startswith("cpu provider")
    assert "not on a GPU" in validation["validated_on"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["provider"] == "cuda"
    # The 8-bit embedding table is CPU-only (its CUDA kernel was never checked on a GPU).
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "GatherBlockQuantized" not in ops
    # CUDA keeps SkipLayerNormalization, one kernel where the CPU graph has three.
    assert "SkipLayerNormalization" in ops
    # The runtime still refuses to *run* a CUDA folder on the CPU.
    with pytest.raises(ProviderUnavailableError, match="exported for the 'cuda' provider"):
        Model(folder)
