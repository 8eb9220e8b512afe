"""The fp32 LM head as row ranges of the table it reads, so that loading it costs no
more memory than running it.

onnxruntime prepacks a constant MatMul/Gemm weight at session creation: it reads the
mapped original, writes a packed copy, then releases the original once no other node
needs it. Two things made gpt2's fp32 LM head, the tied [50257, 768] embedding table
(154 MB), the peak of a process's memory (bench history section 22):

- the Gather of the token embeddings reads the same initializer, so onnxruntime keeps
  all of it mapped, and once packing has read every row, resident, beside the packed
  copy: 154 MB more than the run needs, for as long as the model is loaded;
- onnxruntime prepacks node by node, the head last, so the moment both copies of the
  whole head are resident is also the moment every layer is already packed.

So after the graph is saved, the head's ``Gemm(transB=1)`` becomes one Gemm per range of
at most ``HEAD_PART_BYTES`` of rows and a Concat of their logits. Each range is its own
initializer pointing into the same bytes of the data file (no byte is written twice), read
by nothing but its Gemm: onnxruntime releases each range once packed, and the Gather's
table is only mapped, resident row by row as tokens use them. The packed head is the same
size, so the run's speed does not change.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper
from onnx.external_data_helper import ExternalDataInfo

# About one MLP matrix of gpt2 (768 x 3072 fp32 = 9.4 MB): the most any one prepack adds
# on top of what the loaded model holds anyway.
HEAD_PART_BYTES = 10 * 2**20
# Range offsets stay multiples of this from the table's own offset: onnxruntime maps
# external data at offsets aligned to the OS's allocation granularity (64 KiB on Windows).
_ALIGN = 64 * 2**10


def split_head(model: onnx.ModelProto, part_bytes: int = HEAD_PART_BYTES) -> onnx.ModelProto:
    """Replace the graph's ``Gemm(A, table, transB=1)`` over an external fp32 table by
    row-range Gemms and a Concat (in place; returns ``model``). A graph without such a
    Gemm, or whose table already fits in one part, is returned unchanged.

    ``model`` must be the saved graph: its tables hold references into the data file
    (``onnx.save_model(..., save_as_external_data=True)`` leaves them so), not bytes.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for index, node in enumerate(g.node):
        table = inits.get(node.input[1]) if len(node.input) == 2 else None
        if node.op_type != "Gemm" or table is None or not _is_external_fp32_matrix(table):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB") != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1:
            continue
        row_bytes = table.dims[1] * 4
        ranges = _row_ranges(table.dims[0], row_bytes, part_bytes)
        if len(ranges) < 2:
            return model
        parts, new_nodes = [], []
        for k, (first, end) in enumerate(ranges):
            part = _row_range(table, row_bytes, first, end)
            g.initializer.append(part)
            out = f"{node.output[0]}.part{k}"
            new_nodes.append(helper.make_node("Gemm", [node.input[0], part.name], [out],
                                              name=f"{node.name}_part{k}", transB=1))
            parts.append(out)
        new_nodes.append(helper.make_node("Concat", parts, list(node.output), name=node.name,
                                          axis=1))
        nodes = list(g.node)
        nodes[index:index + 1] = new_nodes
        del g.node[:]
        g.node.extend(nodes)
        if not any(table.name in n.input for n in g.node):
            g.initializer.remove(table)  # an untied head: its bytes stay, as the ranges
        return model
    return model


def _is_external_fp32_matrix(t: onnx.TensorProto) -> bool:
    return (t.data_location == onnx.TensorProto.EXTERNAL and t.data_type == onnx.TensorProto.FLOAT
            and len(t.dims) == 2)


def _row_ranges(rows: int, row_bytes: int, part_bytes: int) -> list[tuple[int, int]]:
    """[first, end) row ranges of at most ``part_bytes`` (at least one aligned step)."""
    step = _ALIGN // math.gcd(row_bytes, _ALIGN)  # rows per aligned offset
    per_part = max(step, part_bytes // row_bytes // step * step)
    return [(first, min(rows, first + per_part)) for first in range(0, rows, per_part)]


def _row_range(table: onnx.TensorProto, row_bytes: int, first: int, end: int
               ) -> onnx.TensorProto:
    """A tensor of rows [first, end) of ``table``: the same file, offset and row width."""
    ext = ExternalDataInfo(table)
    part = onnx.TensorProto(name=f"{table.name}.rows_{first}_{end}", data_type=table.data_type,
                            dims=[end - first, table.dims[1]])
    part.data_location = onnx.TensorProto.EXTERNAL
    # onnx's set_external_data wants the bytes in hand; a range only points at them.
    offset = (ext.offset or 0) + first * row_bytes
    for key, value in (("location", ext.location), ("offset", str(offset)),
                       ("length", str((end - first) * row_bytes))):
        entry = part.external_data.add()
        entry.key, entry.value = key, value
    return part
