"""fp16 / int8 / int4 versions of the fused graph, made by onnxruntime's own tools.

- fp16: ``onnxruntime.transformers.float16`` (logits stay fp32; GroupQueryAttention and
  the LayerNorm kernels accumulate in fp32 internally).
- int8: ``onnxruntime.quantization.quantize_dynamic`` on MatMul weights (CPU), then
  ``per_row_activations``: each token's activations get their own scale, so a row's
  logits do not depend on the other rows of its run (see there).
- int4: ``MatMulNBitsQuantizer`` (weight-only, block-wise; accuracy_level 4 = int8 compute
  on the CPU, the fast path). The block size trades fidelity for speed (bench history
  section 20): 32 by default, as llama.cpp's q4_0 and onnxruntime-genai's builder; 128 is
  OpenVINO's default group size.
- int8 and int4 on the CPU: the token embedding table, read one row per token, is stored
  in 8-bit blocks and read by onnxruntime's ``GatherBlockQuantized``
  (``quantize_embedding_table``; bench history section 21): a gpt2 folder loses 111 MB.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gpt2onnx.contract import LOGITS, NEXT_TOKEN
from gpt2onnx.errors import InvalidParameterError

INT4_BLOCK_SIZE = 32
# MatMulNBits takes powers of two from 16; onnxruntime's CPU kernels stop at 256.
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
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
        return per_row_activations(onnx.load(str(out)))


# Symmetric int8 levels -127..127 stored as uint8 around this zero point: MLAS's fast
# integer GEMMs take uint8 activations against int8 weights.
_ROW_ZERO_POINT = 128


def per_row_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every ``DynamicQuantizeLinear`` (one scale and zero point for the whole
    input tensor) by a symmetric quantization with one scale per token row.

    Why: with one scale per run, a row's int8 activations depend on every other row in
    the run, so a prompt batched with others, or a position verified inside a k+1-token
    speculative run, got other logits than alone (max |diff| 0.05-0.07 on gpt2, enough
    to change greedy tokens). Per row, the integer GEMM is exact and every float op is
    per row, so batched decode is bit-identical to batch 1. It is also closer to fp32
    (pydoc-tiny against transformers: logits max|diff|/range 0.028 against 0.049).

    Per row: ``scale = max(|x|) / 127`` over the last axis, ``q = trunc(x / scale +
    128.5)`` (round half up, in 1..255) and the constant zero point 128. The existing
    ``Mul(scale, weight_scale)`` broadcasts the [..., 1] scale, and onnxruntime still
    fuses the MatMul into ``MatMulIntegerToFloat``. Costs 7 small nodes per MatMul
    (bench history section 14).
    """
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = {i.name for i in g.initializer}
    inv127, eps, shift = "rowq_inv127", "rowq_eps", "rowq_shift"
    zero_point = "rowq_zero_point"
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type != "DynamicQuantizeLinear":
            nodes.append(n)
            continue
        x, (q, scale, zp) = n.input[0], n.output
        for matmul in consumers[zp]:
            # quantize_dynamic's pattern: MatMulInteger(q, w, zp, w_zp) -> Cast -> Mul.
            assert matmul.op_type == "MatMulInteger" and list(matmul.input).index(zp) == 2
            matmul.input[2] = zero_point
            _keep_bias_out_of_the_fused_matmul(matmul, consumers, constants)
        p = f"{x}_rowq"
        nodes += [
            helper.make_node("Abs", [x], [f"{p}_abs"], name=f"{p}_abs"),
            helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_amax"], name=f"{p}_amax",
                             axes=[-1], keepdims=1),
            # An all-zero row would divide by zero: give it a tiny scale (it stays 0).
            helper.make_node("Max", [f"{p}_amax", eps], [f"{p}_amax_safe"],
                             name=f"{p}_amax_safe"),
            helper.make_node("Mul", [f"{p}_amax_safe", inv127], [scale], name=f"{p}_scale"),
            helper.make_node("Div", [x, scale], [f"{p}_levels"], name=f"{p}_levels"),
            # Cast to uint8 truncates; +128.5 makes that round-half-up around 128.
            helper.make_node("Add", [f"{p}_levels", shift], [f"{p}_shifted"],
                             name=f"{p}_shifted"),
            helper.make_node("Cast", [f"{p}_shifted"], [q], name=f"{p}_q",
                             to=onnx.TensorProto.UINT8),
        ]
    assert len(nodes) > len(g.node), "quantize_dynamic left no DynamicQuantizeLinear"
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend([
        numpy_helper.from_array(np.array(1 / 127, np.float32), inv127),
        numpy_helper.from_array(np.array(1e-30, np.float32), eps),
        numpy_helper.from_array(np.array(_ROW_ZERO_POINT + 0.5, np.float32), shift),
        numpy_helper.from_array(np.array(_ROW_ZERO_POINT, np.uint8), zero_point),
    ])
    return model


def _keep_bias_out_of_the_fused_matmul(matmul: onnx.NodeProto,
                                       consumers: dict[str, list[onnx.NodeProto]],
                                       constants: set[str]) -> None:
    """onnxruntime 1.32 folds a constant ``Add`` after the dequantizing Mul into
    ``MatMulIntegerToFloat``'s bias, and with a non-scalar a_scale that kernel returns
    ``a_scale * (A @ B * b_scale + bias)``: the bias gets scaled by each row's scale
    (checked in tests/export/test_int8_rows.py). A ``Sum`` is not folded."""
    for cast in consumers.get(matmul.output[0], []):
        for dequant in consumers.get(cast.output[0], []):
            for add in consumers.get(dequant.output[0], []):
                if add.op_type == "Add" and any(i in constants for i in add.input):
                    add.op_type = "Sum"


def check_int4_block_size(block_size: int | None, precision: str) -> None:
    if block_size is None:
        return
    if precision != "int4":
        raise InvalidParameterError(
            "int4_block_size", f"--int4-block-size applies to --precision int4 only, got "
            f"{block_size!r} with --precision {precision}; drop it or export int4.")
    if type(block_size) is not int or block_size not in INT4_BLOCK_SIZES:
        raise InvalidParameterError(
            "int4_block_size", f"--int4-block-size must be one of {INT4_BLOCK_SIZES}, got "
            f"{block_size!r}; smaller blocks are closer to fp32, larger ones faster.")


def to_int4(model: onnx.ModelProto, block_size: int | None = None) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size or INT4_BLOCK_SIZE,
                                     is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL)
    quantizer.process()
    return quantizer.model.model


# The token embedding table (checkpoint name) and its 8-bit block size along n_embd.
EMBEDDING_TABLE = "transformer.wte.weight"
EMBEDDING_BLOCK = 32


def quantize_embedding_table(model: onnx.ModelProto,
                             table: str = EMBEDDING_TABLE) -> onnx.ModelProto:
    """Replace ``Gather(table, ids)`` by ``GatherBlockQuantized`` over an 8-bit copy.

    Why: in an int8 or int4 folder the [vocab, n_embd] fp32 table is most of the bytes
    (154 MB of gpt2's 285 / 239 MB) and of the loaded weights, yet each token reads one
    row of it. Blocks of EMBEDDING_BLOCK values along n_embd share a scale: symmetric,
    ``scale = max|block| / 127``, stored as uint8 around onnxruntime's default zero point
    128 for 8 bits. onnxruntime's own weight quantizer makes this node for 4 bits only
    (``MatMulNBitsQuantizer`` with Gather), which cost pydoc-tiny 1.8 points of top-1
    agreement; 8 bits cost none measurable (bench history section 21). A graph whose
    table has another reader (a tied LM head) or a width that is not a multiple of the
    block is returned unchanged.
    """
    g = model.graph
    readers = [n for n in g.node if table in n.input]
    found = [t for t in g.initializer if t.name == table]
    if (len(found) != 1 or len(readers) != 1 or readers[0].op_type != "Gather"
            or list(readers[0].input) != [table, readers[0].input[1]]
            or any(a.name == "axis" and a.i != 0 for a in readers[0].attribute)):
        return model
    weights = numpy_helper.to_array(found[0]).astype(np.float32)
    vocab, width = weights.shape
    if width % EMBEDDING_BLOCK:
        return model
    blocks = weights.reshape(vocab, width // EMBEDDING_BLOCK, EMBEDDING_BLOCK)
    amax = np.abs(blocks).max(axis=-1)
    scales = np.where(amax > 0, amax / 127, 1).astype(np.float32)  # [vocab, width / block]
    levels = np.clip(np.rint(blocks / scales[..., None]), -127, 127) + 128
    gather = readers[0]
    q_name, s_name = f"{table}_q8", f"{table}_scales"
    node = helper.make_node("GatherBlockQuantized", [q_name, gather.input[1], s_name],
                            list(gather.output), name=gather.name, domain="com.microsoft",
                            gather_axis=0, quantize_axis=1, block_size=EMBEDDING_BLOCK,
                            bits=8)
    nodes = [node if n is gather else n for n in g.node]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.remove(found[0])
    g.initializer.extend([
        numpy_helper.from_array(levels.astype(np.uint8).reshape(vocab, width), q_name),
        numpy_helper.from_array(scales, s_name)])
    return model


def apply_precision(model: onnx.ModelProto, precision: str,
                    int4_block_size: int | None = None) -> onnx.ModelProto:
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
        return to_int4(model, int4_block_size)
    raise AssertionError(precision)
