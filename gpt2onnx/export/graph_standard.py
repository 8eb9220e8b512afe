"""The `standard` layout: ONNX standard ops only (opset 17), any execution provider.

present = concat(past, new) every step; logits for every input position. The IO
names and axes are those of optimum and transformers.js, so folders interchange.
"""

from __future__ import annotations

import numpy as np
import onnx

from gpt2onnx.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    past_name,
    present_name,
    standard_io,
)
from gpt2onnx.export.checkpoint import ModelSpec, Weights
from gpt2onnx.export.graph_builder import GraphBuilder
from gpt2onnx.export.graph_parts import (
    embeddings,
    layer_norm,
    linear,
    lm_head_weight,
    mlp,
    mlp_weights,
    project_vocab,
)

OPSET = 17
# What masked scores become before Softmax: the most negative finite fp32, as
# transformers' eager attention uses, so fully masked rows stay finite (uniform).
MASK_VALUE = float(np.finfo(np.float32).min)


def _attention_mask(g: GraphBuilder) -> str:
    """[batch, 1, seq, total_seq] bool: key j is visible to query i when the mask
    keeps j and j <= past_seq + i (causal over absolute cache positions)."""
    total = g.op("Squeeze", [g.op("Shape", [ATTENTION_MASK], "total_1d", start=1, end=2)],
                 "total")
    seq = g.op("Squeeze", [g.op("Shape", [INPUT_IDS], "seq_1d", start=1, end=2)], "seq")
    past = g.op("Sub", [total, seq], "past_len")
    one = g.const(1)
    q_pos = g.op("Range", [past, total, one], "q_pos")  # [seq]
    k_pos = g.op("Range", [g.const(0), total, one], "k_pos")  # [total]
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_pos, g.const([0])]),
                                  g.op("Unsqueeze", [q_pos, g.const([1])])], "causal")
    keep = g.op("Cast", [ATTENTION_MASK], "keep", to=onnx.TensorProto.BOOL)
    keep = g.op("Unsqueeze", [keep, g.const([1, 2])], "keep_4d")  # [batch, 1, 1, total]
    return g.op("And", [causal, keep], "visible")


def _split_heads(g: GraphBuilder, x: str, spec: ModelSpec, hint: str) -> str:
    """[batch, seq, n_embd] -> [batch, n_head, seq, head_dim]."""
    shaped = g.op("Reshape", [x, g.const([0, 0, spec.n_head, spec.head_dim])], f"{hint}_bsnh")
    return g.op("Transpose", [shaped], hint, perm=[0, 2, 1, 3])


def _attention(g: GraphBuilder, spec: ModelSpec, i: int, h: str, visible: str,
               w: dict[str, str]) -> str:
    qkv = linear(g, h, w["attn_w"], w["attn_b"], f"h{i}_qkv")
    e = spec.n_embd
    q, k, v = g.op_multi("Split", [qkv, g.const([e, e, e])], f"h{i}_split", n_out=3, axis=-1)
    q = _split_heads(g, q, spec, f"h{i}_q")
    k = _split_heads(g, k, spec, f"h{i}_k")
    v = _split_heads(g, v, spec, f"h{i}_v")
    present_k = g.op("Concat", [past_name(i, "key"), k], present_name(i, "key"), axis=2)
    present_v = g.op("Concat", [past_name(i, "value"), v], present_name(i, "value"), axis=2)
    k_t = g.op("Transpose", [present_k], f"h{i}_kt", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q, k_t], f"h{i}_scores")  # [batch, n_head, seq, total]
    scale = spec.attn_scale(i)
    if scale != 1.0:
        scores = g.op("Mul", [scores, g.const(scale, "float32")], f"h{i}_scaled")
    scores = g.op("Where", [visible, scores, g.const(MASK_VALUE, "float32")], f"h{i}_masked")
    probs = g.op("Softmax", [scores], f"h{i}_probs", axis=-1)
    ctx = g.op("MatMul", [probs, present_v], f"h{i}_ctx")  # [batch, n_head, seq, head_dim]
    ctx = g.op("Transpose", [ctx], f"h{i}_ctx_t", perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, g.const([0, 0, e])], f"h{i}_merged")
    return linear(g, ctx, w["proj_w"], w["proj_b"], f"h{i}_attn")


def build_standard(spec: ModelSpec, weights: Weights) -> onnx.ModelProto:
    """GPT2LMHeadModel.forward(input_ids, attention_mask, position_ids, past_key_values)."""
    g = GraphBuilder("gpt2_standard", OPSET)
    inputs, outputs = standard_io(spec.n_layer, spec.n_head, spec.head_dim, spec.vocab_size,
                                  "float32")
    for s in inputs:
        g.add_input(s)

    x = embeddings(g, weights, INPUT_IDS, POSITION_IDS)
    visible = _attention_mask(g)
    for i, lw in enumerate(weights.layers):
        p = f"transformer.h.{i}"
        aw = {
            "attn_w": g.weight(f"{p}.attn.c_attn.weight", lw.attn_w),
            "attn_b": g.weight(f"{p}.attn.c_attn.bias", lw.attn_b),
            "proj_w": g.weight(f"{p}.attn.c_proj.weight", lw.attn_proj_w),
            "proj_b": g.weight(f"{p}.attn.c_proj.bias", lw.attn_proj_b),
        }
        ln1 = layer_norm(g, x, g.weight(f"{p}.ln_1.weight", lw.ln_1_w),
                         g.weight(f"{p}.ln_1.bias", lw.ln_1_b), spec.layer_norm_epsilon,
                         f"h{i}_ln1")
        x = g.op("Add", [x, _attention(g, spec, i, ln1, visible, aw)], f"h{i}_res1")
        mw = mlp_weights(g, i, lw)
        ln2 = layer_norm(g, x, mw["ln_2_w"], mw["ln_2_b"], spec.layer_norm_epsilon, f"h{i}_ln2")
        x = g.op("Add", [x, mlp(g, spec, i, ln2, mw)], f"h{i}_res2")

    x = layer_norm(g, x, g.weight("transformer.ln_f.weight", weights.ln_f_w),
                   g.weight("transformer.ln_f.bias", weights.ln_f_b), spec.layer_norm_epsilon,
                   "ln_f")
    rows = g.op("Reshape", [x, g.const([-1, spec.n_embd])], "hidden_2d")
    logits_2d = project_vocab(g, rows, lm_head_weight(g, weights))
    out_shape = g.op("Concat", [g.op("Shape", [INPUT_IDS]), g.const([spec.vocab_size])],
                     "logits_shape", axis=0)
    logits = g.op("Reshape", [logits_2d, out_shape], LOGITS)

    g.add_output(outputs[0], logits)
    for s in outputs[1:]:
        g.add_output(s, s.name)
    return g.model(doc="GPT-2 with past_key_values, standard layout (gpt2onnx)")
