"""fp16 / int8 / int4 versions of the fused graph, made by onnxruntime's own tools.

- fp16: ``onnxruntime.transformers.float16`` (logits stay fp32; GroupQueryAttention and
  the LayerNorm kernels accumulate in fp32 internally).
- int8: ``onnxruntime.quantization.quantize_dynamic`` on MatMul weights (CPU).
- int4: ``MatMulNBitsQuantizer`` (weight-only, block-wise; accuracy_level 4 = int8 compute
  on the CPU, the fast path).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from gpt2onnx.contract import LOGITS, NEXT_TOKEN
from gpt2onnx.errors import InvalidParameterError

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4

# Which (precision, provider) pairs have kernels for every node of the fused graph.
# GroupQueryAttention's CUDA kernel takes fp16/bf16 only; dynamic int8 (MatMulInteger /
# DynamicQuantizeMatMul) has no CUDA kernel. Anything else would silently run on the CPU.
SUPPORTED = {
    ("fp32", "cpu"), ("fp16", "cpu"), ("int8", "cpu"), ("int4", "cpu"),
    ("fp16", "cuda"), ("int4", "cuda"),
}
_FIX = {
    ("fp32", "cuda"): "GroupQueryAttention's CUDA kernel takes fp16/bf16 only: use "
                      "--precision fp16 (or int4) for CUDA, or --layout standard for fp32.",
    ("int8", "cuda"): "dynamic int8 MatMuls have no CUDA kernels: use --precision int4 "
                      "(MatMulNBits) or fp16 for CUDA.",
}


def check_pair(precision: str, provider: str) -> None:
    if (precision, provider) not in SUPPORTED:
        raise InvalidParameterError(
            "precision", f"--layout fused --precision {precision} --provider {provider} is not "
            f"available: {_FIX.get((precision, provider), 'no kernels for it')}")


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Logits leave in fp32 (sampling and log-probs need it); ArgMax reads the fp32 logits.
    return convert_float_to_float16(model, keep_io_types=[LOGITS], disable_shape_infer=True,
                                    node_block_list=[f"n_{NEXT_TOKEN}"])


def to_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul"],
                         weight_type=QuantType.QInt8, per_channel=False,
                         # contrib-op outputs defeat ONNX shape inference; say they are float
                         extra_options={"MatMulConstBOnly": True,
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(str(out))


def to_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK_SIZE,
                                     is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL)
    quantizer.process()
    return quantizer.model.model


def apply_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    # The quantizers log a line per node at INFO; the export's progress bar says enough.
    for name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer",
                 "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if precision == "fp32":
        return model
    if precision == "fp16":
        return to_fp16(model)
    if precision == "int8":
        return to_int8(model)
    if precision == "int4":
        return to_int4(model)
    raise AssertionError(precision)
