"""The mixed graph: one model run for one-token rows and a prompt chunk together.

GroupQueryAttention takes one new-token count per run, so the fused graph runs decode
rows (one token each) and a prompt chunk (many tokens onto one slot, or several empty
slots right-padded) as separate runs, and each run is one more pass over the weights.
Every node but attention works token by token, though. The mixed graph is the finished
fused graph (any precision) with its token axis reinterpreted: ``input_ids`` is
[1, tokens], lane 1's rows first, then lane 2's; each GroupQueryAttention becomes two,
one per lane, over the two parts of one Split of the QKV, and their outputs are joined
again. Lane 1 keeps the fused IO names (``seqlens_k``, ``past_key_values.*``); lane 2 has
its own (``chunk.``-prefixed), which the runtime binds to other slots of the same cache
buffers. ``logits_index`` holds positions on the joined axis, so one LM head serves both
lanes.

Inside, the tokens run as a column, [tokens, 1, hidden], not a row: lane 1 is then
already GroupQueryAttention's [rows, 1, 3 x hidden], and only lane 2 is reshaped, into
and out of [chunk rows, width, ...]. The serving loop's usual step has no chunk (its
lane 2 is one decode row), so these nodes are paid on every step: a decode-only run of
16 gpt2 rows took 1.02-1.10x the plain graph's with both lanes sliced and each reshaped
in and out, 1.00-1.04x as a column (bench/results/history.md, section 24).
"""

from __future__ import annotations

import onnx
from onnx import helper

from gpt2onnx.contract import (
    INPUT_IDS,
    LOGITS,
    LOGITS_INDEX,
    NEXT_TOKEN,
    POSITION_IDS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    TensorSpec,
    chunk_name,
    mixed_io,
)
from gpt2onnx.export.graph_builder import elem_type

_GQA = "GroupQueryAttention"


def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, elem_type(spec.dtype), list(spec.shape))


def mixed_graph(model: onnx.ModelProto, n_layer: int, n_head: int, head_dim: int,
                vocab: int, cache_dtype: str) -> onnx.ModelProto:
    """The mixed form of a finished fused graph. Initializers are carried over as they
    are (external-data references stay references), so save the fused graph with its
    weights external first and both graphs share one data file."""
    g = model.graph
    if sum(n.op_type == _GQA for n in g.node) != n_layer:
        raise AssertionError(f"a fused graph has one {_GQA} per layer ({n_layer})")
    inputs, outputs = mixed_io(n_layer, n_head, head_dim, vocab, cache_dtype)
    fresh = iter(range(1 << 30))

    def name(hint: str) -> str:
        return f"mixed_{hint}_{next(fresh)}"

    def const(values: list[int]) -> str:
        out = name("const")
        nodes.append(helper.make_node(
            "Constant", [], [out], name=name("n"),
            value=helper.make_tensor(out, onnx.TensorProto.INT64, [len(values)], values)))
        return out

    nodes: list[onnx.NodeProto] = []
    # The token axis as a column: [1, tokens] ids become [tokens, 1].
    column = const([-1, 1])
    as_column = {INPUT_IDS: name("input_ids_column"), POSITION_IDS: name("position_ids_column")}
    for ids, out in as_column.items():
        nodes.append(helper.make_node("Reshape", [ids, column], [out], name=name("n")))
    # Lane sizes from the lengths' shapes: lane 1's rows (one token each) come first on
    # the column, lane 2's tokens (chunk rows x width) after them.
    rows = name("rows")
    nodes.append(helper.make_node("Shape", [SEQLENS_K], [rows], name=name("n")))
    chunk_rows = name("chunk_rows")
    nodes.append(helper.make_node("Shape", [chunk_name(SEQLENS_K)], [chunk_rows],
                                  name=name("n")))
    tokens = name("tokens")
    nodes.append(helper.make_node("Shape", [as_column[INPUT_IDS]], [tokens], name=name("n"),
                                  end=1))
    chunk_tokens = name("chunk_tokens")
    nodes.append(helper.make_node("Sub", [tokens, rows], [chunk_tokens], name=name("n")))
    lane_sizes = name("lane_sizes")
    nodes.append(helper.make_node("Concat", [rows, chunk_tokens], [lane_sizes],
                                  name=name("n"), axis=0))
    lane2_shape = name("lane2_shape")  # [chunk rows, -1, 0]: 0 keeps the channels
    nodes.append(helper.make_node("Concat", [chunk_rows, const([-1]), const([0])],
                                  [lane2_shape], name=name("n"), axis=0))
    column_shape, row_shape = const([-1, 1, 0]), const([1, -1, 0])
    gathers = 0

    for source in g.node:
        node = onnx.NodeProto()
        node.CopyFrom(source)  # the fused graph stays as it was
        for i, x in enumerate(node.input):
            if x in as_column:
                node.input[i] = as_column[x]
        if node.op_type == "GatherND":
            # The LM head picks positions of a [1, tokens] row: the column turns back.
            gathers += 1
            row = name("hidden_row")
            nodes.append(helper.make_node("Reshape", [node.input[0], row_shape], [row],
                                          name=name("n")))
            node.input[0] = row
        if node.op_type != _GQA:
            nodes.append(node)
            continue
        qkv, _, _, past_k, past_v, seqlens, total = node.input[:7]
        attn, present_k, present_v = node.output[:3]
        q1, q2_column, q2 = name("qkv_lane1"), name("qkv_lane2_column"), name("qkv_lane2")
        nodes.append(helper.make_node("Split", [qkv, lane_sizes], [q1, q2_column],
                                      name=name("n"), axis=0))
        nodes.append(helper.make_node("Reshape", [q2_column, lane2_shape], [q2],
                                      name=name("n")))
        a1, a2 = name("attn_lane1"), name("attn_lane2")
        lane1 = helper.make_node(_GQA, [q1, "", "", past_k, past_v, seqlens, total],
                                 [a1, present_k, present_v], name=node.name + "_lane1",
                                 domain=node.domain)
        lane2 = helper.make_node(
            _GQA, [q2, "", "", chunk_name(past_k), chunk_name(past_v),
                   chunk_name(SEQLENS_K), chunk_name(TOTAL_SEQUENCE_LENGTH)],
            [a2, chunk_name(present_k), chunk_name(present_v)], name=node.name + "_lane2",
            domain=node.domain)
        for copy in (lane1, lane2):
            copy.attribute.extend(node.attribute)
        nodes += [lane1, lane2]
        a2_column = a2 + "_column"
        nodes.append(helper.make_node("Reshape", [a2, column_shape], [a2_column],
                                      name=name("n")))
        nodes.append(helper.make_node("Concat", [a1, a2_column], [attn], name=name("n"),
                                      axis=0))
        del seqlens, total
    if gathers != 1:
        raise AssertionError(f"a fused graph picks its logits' positions with one GatherND, "
                             f"found {gathers}")

    graph = helper.make_graph(nodes, g.name + "_mixed", [_value_info(s) for s in inputs],
                              [_value_info(s) for s in outputs])
    graph.initializer.extend(g.initializer)
    mixed = helper.make_model(graph, opset_imports=list(model.opset_import),
                              producer_name=model.producer_name,
                              doc_string=model.doc_string + " (mixed: two attention lanes)")
    mixed.ir_version = model.ir_version
    mixed.metadata_props.extend(model.metadata_props)
    # Names the runtime relies on, checked here rather than at the first run.
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    for needed in (INPUT_IDS, POSITION_IDS, LOGITS_INDEX, LOGITS, NEXT_TOKEN):
        assert needed in names, needed
    return mixed
