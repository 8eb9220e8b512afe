"""int8 / int4 CPU folders read the token embedding table from 8-bit blocks
(``precision.quantize_embedding_table``, onnxruntime's GatherBlockQuantized)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpt2onnx.export.precision import (
    EMBEDDING_BLOCK,
    EMBEDDING_TABLE,
    quantize_embedding_table,
)


def _gather_graph(table: np.ndarray, tied: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Gather", [EMBEDDING_TABLE, "ids"], ["rows"], name="tok_emb")]
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)]
    if tied:  # a head that reads the same table, as the fp32 fused graph's Gemm does
        nodes.append(helper.make_node("Gemm", ["rows2d", EMBEDDING_TABLE], ["logits"],
                                      transB=1))
        nodes.insert(1, helper.make_node("Reshape", ["rows", "flat"], ["rows2d"]))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        outputs, initializer=[numpy_helper.from_array(table, EMBEDDING_TABLE),
                              numpy_helper.from_array(np.array([-1, table.shape[1]]), "flat")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(["rows"], {"ids": ids})[0]


def test_rows_are_within_half_a_level_of_the_table():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((300, 4 * EMBEDDING_BLOCK)).astype(np.float32)
    table[7] = 0.0  # an all-zero row must stay zero, not divide by zero
    table[9, :EMBEDDING_BLOCK] *= 50  # an outlier block gets its own scale
    model = quantize_embedding_table(_gather_graph(table))
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["GatherBlockQuantized"]
    assert EMBEDDING_TABLE not in {t.name for t in model.graph.initializer}
    ids = np.array([0, 7, 9, 299, 9])
    got = _run(model, ids)
    blocks = table[ids].reshape(len(ids), -1, EMBEDDING_BLOCK)
    half_level = np.abs(blocks).max(-1, keepdims=True) / 127 / 2
    err = np.abs(got.reshape(blocks.shape) - blocks)
    assert (err <= half_level + 1e-6).all()
    assert (got[1] == 0).all()
    # The outlier block does not coarsen the rest of its row.
    assert np.abs(got[2, EMBEDDING_BLOCK:] - table[9, EMBEDDING_BLOCK:]).max() < 0.02


def test_a_table_with_another_reader_is_left_alone():
    table = np.ones((10, EMBEDDING_BLOCK), np.float32)
    model = _gather_graph(table, tied=True)
    before = model.SerializeToString()
    assert quantize_embedding_table(model).SerializeToString() == before


def test_a_width_off_the_block_is_left_alone():
    model = _gather_graph(np.ones((10, EMBEDDING_BLOCK + 8), np.float32))
    assert [n.op_type for n in quantize_embedding_table(model).graph.node] == ["Gather"]


def _table_ops(folder) -> tuple[set[str], set[str]]:
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return ({n.op_type for n in graph.node if "Gather" in n.op_type},
            {t.name for t in graph.initializer})


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cpu_int8_and_int4_folders_read_an_8_bit_table(precision, tiny_checkpoint,
                                                       export_folder):
    folder = export_folder(tiny_checkpoint, layout="fused", precision=precision)
    ops, names = _table_ops(folder)
    assert "GatherBlockQuantized" in ops and EMBEDDING_TABLE not in names
    fp32 = export_folder(tiny_checkpoint, layout="fused", precision="fp32")
    ops32, names32 = _table_ops(fp32)
    assert "GatherBlockQuantized" not in ops32 and EMBEDDING_TABLE in names32
