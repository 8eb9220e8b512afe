"""Pieces of the GPT-2 forward pass that both layouts share, in standard ONNX ops."""

from __future__ import annotations

import math

from gpt2onnx.export.checkpoint import TANH_GELUS, LayerWeights, ModelSpec, Weights
from gpt2onnx.export.graph_builder import GraphBuilder


def embeddings(g: GraphBuilder, w: Weights, input_ids: str, position_ids: str) -> str:
    """wte[input_ids] + wpe[position_ids] -> [batch, seq, n_embd]."""
    wte = g.weight("transformer.wte.weight", w.wte)
    wpe = g.weight("transformer.wpe.weight", w.wpe)
    tok = g.op("Gather", [wte, input_ids], "tok_emb")
    pos = g.op("Gather", [wpe, position_ids], "pos_emb")
    return g.op("Add", [tok, pos], "embeds")


def layer_norm(g: GraphBuilder, x: str, weight: str, bias: str, eps: float, hint: str) -> str:
    return g.op("LayerNormalization", [x, weight, bias], hint, axis=-1, epsilon=eps)


def linear(g: GraphBuilder, x: str, w: str, b: str | None, hint: str) -> str:
    y = g.op("MatMul", [x, w], f"{hint}_mm")
    return g.op("Add", [y, b], hint) if b is not None else y


def activation(g: GraphBuilder, x: str, name: str, hint: str) -> str:
    """transformers' ACT2FN[name], spelled in standard ops."""
    if name in TANH_GELUS:
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = g.op("Mul", [g.op("Mul", [x, x]), x], f"{hint}_x3")
        inner = g.op("Add", [x, g.op("Mul", [x3, g.const(0.044715, "float32")])])
        t = g.op("Tanh", [g.op("Mul", [inner, g.const(math.sqrt(2 / math.pi), "float32")])])
        half_x = g.op("Mul", [x, g.const(0.5, "float32")])
        return g.op("Mul", [half_x, g.op("Add", [t, g.const(1.0, "float32")])], hint)
    if name == "gelu":
        # 0.5 x (1 + erf(x / sqrt(2)))
        e = g.op("Erf", [g.op("Mul", [x, g.const(1 / math.sqrt(2), "float32")])])
        half_x = g.op("Mul", [x, g.const(0.5, "float32")])
        return g.op("Mul", [half_x, g.op("Add", [e, g.const(1.0, "float32")])], hint)
    if name == "relu":
        return g.op("Relu", [x], hint)
    if name in ("silu", "swish"):
        return g.op("Mul", [x, g.op("Sigmoid", [x])], hint)
    if name == "quick_gelu":
        s = g.op("Sigmoid", [g.op("Mul", [x, g.const(1.702, "float32")])])
        return g.op("Mul", [x, s], hint)
    if name == "tanh":
        return g.op("Tanh", [x], hint)
    if name == "sigmoid":
        return g.op("Sigmoid", [x], hint)
    if name == "linear":
        return x
    raise AssertionError(f"activation {name!r} passed spec_from_config but has no graph")


def mlp_weights(g: GraphBuilder, i: int, lw: LayerWeights) -> dict[str, str]:
    p = f"transformer.h.{i}"
    return {
        "ln_2_w": g.weight(f"{p}.ln_2.weight", lw.ln_2_w),
        "ln_2_b": g.weight(f"{p}.ln_2.bias", lw.ln_2_b),
        "fc_w": g.weight(f"{p}.mlp.c_fc.weight", lw.fc_w),
        "fc_b": g.weight(f"{p}.mlp.c_fc.bias", lw.fc_b),
        "proj_w": g.weight(f"{p}.mlp.c_proj.weight", lw.fc_proj_w),
        "proj_b": g.weight(f"{p}.mlp.c_proj.bias", lw.fc_proj_b),
    }


def mlp(g: GraphBuilder, spec: ModelSpec, i: int, h: str, mw: dict[str, str]) -> str:
    """c_proj(act(c_fc(h)))  [batch, seq, n_embd]."""
    up = linear(g, h, mw["fc_w"], mw["fc_b"], f"h{i}_fc")
    act = activation(g, up, spec.activation, f"h{i}_act")
    return linear(g, act, mw["proj_w"], mw["proj_b"], f"h{i}_mlp")


def lm_head_weight(g: GraphBuilder, w: Weights) -> str:
    """[vocab, n_embd]. Tied checkpoints reuse the embedding initializer: stored once."""
    if w.lm_head is None:
        return "transformer.wte.weight"
    return g.weight("lm_head.weight", w.lm_head)


def project_vocab(g: GraphBuilder, h2d: str, head: str) -> str:
    """[rows, n_embd] -> [rows, vocab] as Gemm(transB=1): reads the [vocab, n_embd]
    weight in place, so the tied matrix is neither duplicated on disk nor by ORT's
    constant folding of a Transpose."""
    return g.op("Gemm", [h2d, head], "logits_2d", transB=1)
