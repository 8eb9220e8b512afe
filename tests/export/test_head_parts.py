"""The fp32 LM head as row ranges of its table (export/head_parts.py): a CPU fused folder's
Gemm over the tied embedding table becomes range Gemms and a Concat that read the same
bytes of model.onnx.data, and the logits do not change."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpt2onnx.contract import GRAPH_FILE, MIXED_GRAPH_FILE
from gpt2onnx.export import folder as model_folder
from gpt2onnx.export.api import ExportOptions, export_model
from gpt2onnx.export.folder import EXTERNAL_DATA_FILE
from gpt2onnx.export.head_parts import HEAD_PART_BYTES, split_head

TABLE = "transformer.wte.weight"


def _ext(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _head_ranges(model: onnx.ModelProto, table: str) -> list[onnx.TensorProto]:
    inits = {t.name: t for t in model.graph.initializer}
    parts = [inits[n.input[1]] for n in model.graph.node
             if n.op_type == "Gemm" and n.input[1].startswith(table + ".rows_")]
    return sorted(parts, key=lambda t: int(_ext(t)["offset"]))


def _toy_graph(table: np.ndarray, tied: bool) -> onnx.ModelProto:
    """ids -> Gather(table) -> Gemm(transB=1) against the same table (tied) or its own."""
    head = "table" if tied else "head"
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="emb"),
             helper.make_node("Gemm", ["rows", head], ["logits"], name="lm_head", transB=1)]
    inits = [numpy_helper.from_array(table, "table")]
    if not tied:
        inits.append(numpy_helper.from_array(table[::-1].copy(), "head"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save_external(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    return path


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"ids": ids})[0]


@pytest.mark.parametrize("tied", [True, False])
def test_split_head_gives_the_same_logits(tmp_path, tied):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((5000, 16), dtype=np.float32)  # 64 B rows: 1024 per 64 KiB
    path = _save_external(_toy_graph(table, tied), tmp_path)
    ids = np.array([0, 1023, 1024, 4999], dtype=np.int64)
    before = _logits(path, ids)
    data_before = (tmp_path / "m.onnx.data").read_bytes()
    model = onnx.load(str(path), load_external_data=False)
    split_head(model, part_bytes=1500 * 64)  # rounded down to whole aligned steps
    onnx.save_model(model, str(path))

    head = "table" if tied else "head"
    parts = _head_ranges(model, head)
    assert [t.dims[0] for t in parts] == [1024, 1024, 1024, 1024, 904]
    names = {t.name for t in model.graph.initializer}
    assert (head in names) == tied  # an untied head's own initializer is gone
    # The ranges tile the head's bytes exactly, at 64 KiB-aligned steps from its offset.
    start = int(_ext(parts[0])["offset"])
    for a, b in itertools.pairwise(parts):
        assert int(_ext(b)["offset"]) == int(_ext(a)["offset"]) + int(_ext(a)["length"])
        assert (int(_ext(b)["offset"]) - start) % (64 * 1024) == 0
    assert int(_ext(parts[-1])["offset"]) + int(_ext(parts[-1])["length"]) \
        == start + table.nbytes
    assert (tmp_path / "m.onnx.data").read_bytes() == data_before  # no byte written again
    concat = [n for n in model.graph.node if n.op_type == "Concat"]
    assert len(concat) == 1 and concat[0].name == "lm_head" and concat[0].output[0] == "logits"
    np.testing.assert_array_equal(_logits(path, ids), before)


def test_a_head_within_one_part_is_left_as_it_is(tmp_path):
    table = np.ones((1000, 16), dtype=np.float32)  # 64,000 B: under one aligned step
    path = _save_external(_toy_graph(table, tied=True), tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    before = model.SerializeToString()
    split_head(model, part_bytes=64)
    assert model.SerializeToString() == before


def test_split_head_leaves_other_graphs_alone():
    table = np.ones((70000, 16), dtype=np.float32)
    inline = _toy_graph(table, tied=True)  # bytes in the graph, no data file to point into
    before = inline.SerializeToString()
    split_head(inline, part_bytes=1024 * 64)
    assert inline.SerializeToString() == before
    transposed = _toy_graph(table, tied=True)
    attr = transposed.graph.node[1].attribute[0]
    attr.i = 0  # a Gemm without transB reads the table the other way round: not a head
    transposed.graph.initializer[0].data_location = TensorProto.EXTERNAL
    before = transposed.SerializeToString()
    split_head(transposed, part_bytes=1024 * 64)
    assert transposed.SerializeToString() == before


def test_fused_fp32_folder_has_the_split_head(tiny_fused):
    """The tiny fused fp32 folder (vocab 50257 x 64: 12.9 MB, two ranges) in both graphs;
    the token Gather still reads the whole table, and generation is checked elsewhere
    against transformers on this very folder (test_export_parity)."""
    manifest = json.loads((tiny_fused / "manifest.json").read_text())
    assert manifest["precision"] == "fp32"
    table_bytes = 50257 * 64 * 4
    for graph_file in (GRAPH_FILE, MIXED_GRAPH_FILE):
        model = onnx.load(str(tiny_fused / graph_file), load_external_data=False)
        parts = _head_ranges(model, TABLE)
        assert len(parts) == -(-table_bytes // HEAD_PART_BYTES) == 2
        assert all(int(_ext(t)["length"]) <= HEAD_PART_BYTES for t in parts)
        assert sum(t.dims[0] for t in parts) == 50257
        assert {_ext(t)["location"] for t in parts} == {EXTERNAL_DATA_FILE}
        readers = {n.op_type for n in model.graph.node if TABLE in n.input}
        assert readers == {"Gather"}
    # No second copy of the table in the data file.
    assert (tiny_fused / EXTERNAL_DATA_FILE).stat().st_size < 2 * table_bytes


def test_standard_folder_keeps_one_head(tiny_checkpoint, tmp_path, monkeypatch):
    """The standard layout (onnxruntime-genai's IO, and the CUDA path's) keeps its one head
    Gemm even with its weights in a data file."""
    monkeypatch.setattr(model_folder, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "standard"
    export_model(tiny_checkpoint, out, ExportOptions(layout="standard", validate=False))
    model = onnx.load(str(out / GRAPH_FILE), load_external_data=False)
    assert (out / EXTERNAL_DATA_FILE).exists()
    assert _head_ranges(model, TABLE) == []
    assert sum(n.op_type == "Gemm" and TABLE in n.input for n in model.graph.node) == 1
