"""The `fused` layout: ONNX Runtime's com.microsoft ops and an in-place KV cache.

Per layer: MatMul(qkv) -> GroupQueryAttention on packed QKV, whose past and present
are one preallocated [batch, n_head, max_length, head_dim] buffer (the runtime binds
the same OrtValue to both), then the residual add of the projection (and its bias) and
the next LayerNorm: on CUDA one SkipLayerNormalization kernel, on the CPU two Adds and a
LayerNormalization, which onnxruntime's CPU kernels run 6x faster than its
SkipLayerNormalization for a 512-token prompt, 2.5x for 16 rows and 1.3x for one (bench
history section 23); FastGelu folds the MLP bias.
Only the positions named by ``logits_index`` go through ln_f and the LM head (the last
token of a prompt, k+1 positions of a verification, all of them for scoring), and an
ArgMax output gives greedy decoding its token without copying logits off the device.
"""

from __future__ import annotations

import numpy as np
import onnx

from gpt2onnx.contract import (
    INPUT_IDS,
    LOGITS,
    LOGITS_INDEX,
    NEXT_TOKEN,
    POSITION_IDS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    fused_io,
    past_name,
    present_name,
)
from gpt2onnx.errors import UnsupportedConfigError
from gpt2onnx.export.checkpoint import TANH_GELUS, ModelSpec, Weights
from gpt2onnx.export.graph_builder import MS_DOMAIN, GraphBuilder
from gpt2onnx.export.graph_parts import activation, embeddings, layer_norm, lm_head_weight

OPSET = 17


def check_fused(spec: ModelSpec) -> None:
    if spec.head_dim % 8 != 0:
        raise UnsupportedConfigError(
            f"the fused layout needs head_dim (n_embd / n_head = {spec.head_dim}) to be a "
            "multiple of 8 (GroupQueryAttention's kernels); export with --layout standard.")


def _mlp_act(g: GraphBuilder, spec: ModelSpec, i: int, up: str, bias: str) -> str:
    """act(up + bias), folding the bias into the activation kernel where one exists."""
    if spec.activation in TANH_GELUS:
        return g.op("FastGelu", [up, bias], f"h{i}_act", domain=MS_DOMAIN)
    if spec.activation == "gelu":
        return g.op("BiasGelu", [up, bias], f"h{i}_act", domain=MS_DOMAIN)
    return activation(g, g.op("Add", [up, bias], f"h{i}_fc"), spec.activation, f"h{i}_act")


def _residual_norm(g: GraphBuilder, delta: str, bias: str, x: str, gamma: str, beta: str,
                   eps: float, hints: tuple[str, str, str], skip_layer_norm: bool
                   ) -> tuple[str, str]:
    """(LayerNorm(x + delta + bias), x + delta + bias): the new residual stream and the
    next sublayer's input. ``hints``: the node's, the normed output's, the residual's."""
    node, normed, residual = hints
    if skip_layer_norm:
        h, _, _, x = g.op_multi("SkipLayerNormalization", [delta, x, gamma, beta, bias], node,
                                domain=MS_DOMAIN, outputs=[normed, "", "", residual],
                                epsilon=eps)
        return h, x
    # transformers' order: the projection's bias first, then the residual.
    x = g.op("Add", [g.op("Add", [delta, bias], f"{node}_bias"), x], residual)
    return layer_norm(g, x, gamma, beta, eps, normed), x


def build_fused(spec: ModelSpec, w: Weights, quantized_head: bool = False,
                skip_layer_norm: bool = False) -> onnx.ModelProto:
    """The fp32 fused graph; precisions are applied to it afterwards (see precision.py).

    Args:
        quantized_head: give the LM head its own [n_embd, vocab] MatMul weight, so that a
            weight quantizer can shrink it (the tied [vocab, n_embd] matrix must stay a
            float Gather table for the embeddings).
        skip_layer_norm: fold each residual add and LayerNorm into one
            SkipLayerNormalization (for CUDA; on the CPU it is the slower form).
    """
    check_fused(spec)
    g = GraphBuilder("gpt2_fused", OPSET, contrib=True)
    inputs, outputs = fused_io(spec.n_layer, spec.n_head, spec.head_dim, spec.vocab_size,
                               "float32")
    for s in inputs:
        g.add_input(s)
    eps = spec.layer_norm_epsilon

    x = embeddings(g, w, INPUT_IDS, POSITION_IDS)  # [batch, seq, n_embd] residual stream
    l0 = w.layers[0]
    h = layer_norm(g, x, g.weight("transformer.h.0.ln_1.weight", l0.ln_1_w),
                   g.weight("transformer.h.0.ln_1.bias", l0.ln_1_b), eps, "h0_ln1")
    for i, lw in enumerate(w.layers):
        p = f"transformer.h.{i}"
        qkv = g.op("Add", [g.op("MatMul", [h, g.weight(f"{p}.attn.c_attn.weight", lw.attn_w)]),
                           g.weight(f"{p}.attn.c_attn.bias", lw.attn_b)], f"h{i}_qkv")
        attn, _, _ = g.op_multi(
            "GroupQueryAttention",
            [qkv, "", "", past_name(i, "key"), past_name(i, "value"), SEQLENS_K,
             TOTAL_SEQUENCE_LENGTH],
            f"h{i}_gqa", domain=MS_DOMAIN,
            outputs=[f"h{i}_attn", present_name(i, "key"), present_name(i, "value")],
            num_heads=spec.n_head, kv_num_heads=spec.n_head, scale=spec.attn_scale(i))
        proj = g.op("MatMul", [attn, g.weight(f"{p}.attn.c_proj.weight", lw.attn_proj_w)],
                    f"h{i}_attn_proj")
        # h = LN2(x + proj + bias); x = x + proj + bias
        h, x = _residual_norm(
            g, proj, g.weight(f"{p}.attn.c_proj.bias", lw.attn_proj_b), x,
            g.weight(f"{p}.ln_2.weight", lw.ln_2_w), g.weight(f"{p}.ln_2.bias", lw.ln_2_b),
            eps, (f"h{i}_skipln2", f"h{i}_ln2", f"h{i}_res1"), skip_layer_norm)
        up = g.op("MatMul", [h, g.weight(f"{p}.mlp.c_fc.weight", lw.fc_w)], f"h{i}_fc_mm")
        act = _mlp_act(g, spec, i, up, g.weight(f"{p}.mlp.c_fc.bias", lw.fc_b))
        down = g.op("MatMul", [act, g.weight(f"{p}.mlp.c_proj.weight", lw.fc_proj_w)],
                    f"h{i}_mlp_mm")
        down_b = g.weight(f"{p}.mlp.c_proj.bias", lw.fc_proj_b)
        if i + 1 < spec.n_layer:
            nxt = w.layers[i + 1]
            q = f"transformer.h.{i + 1}"
            h, x = _residual_norm(
                g, down, down_b, x, g.weight(f"{q}.ln_1.weight", nxt.ln_1_w),
                g.weight(f"{q}.ln_1.bias", nxt.ln_1_b), eps,
                (f"h{i}_skipln1", f"h{i + 1}_ln1", f"h{i}_res2"), skip_layer_norm)
        else:
            x = g.op("Add", [g.op("Add", [down, down_b]), x], "final_residual")

    # Only the asked-for positions reach ln_f and the LM head: [batch, kept, n_embd].
    index = g.op("Unsqueeze", [LOGITS_INDEX, g.const([2])], "logits_index_3d")
    x_kept = g.op("GatherND", [x, index], "kept_hidden", batch_dims=1)
    x_kept = layer_norm(g, x_kept, g.weight("transformer.ln_f.weight", w.ln_f_w),
                        g.weight("transformer.ln_f.bias", w.ln_f_b), eps, "ln_f")
    if quantized_head:
        head = w.lm_head if w.lm_head is not None else w.wte
        logits = g.op("MatMul", [x_kept, g.weight("lm_head.weight_t",
                                                  np.ascontiguousarray(head.T))], LOGITS)
    else:
        # Gemm reads the tied [vocab, n_embd] table in place but takes 2-D operands.
        flat = g.op("Reshape", [x_kept, g.const([-1, spec.n_embd])], "kept_hidden_2d")
        logits_2d = g.op("Gemm", [flat, lm_head_weight(g, w)], "logits_2d", transB=1)
        out_shape = g.op("Concat", [g.op("Shape", [LOGITS_INDEX]), g.const([spec.vocab_size])],
                         "logits_shape", axis=0)
        logits = g.op("Reshape", [logits_2d, out_shape], LOGITS)
    next_token = g.op("ArgMax", [logits], NEXT_TOKEN, axis=-1, keepdims=0)

    g.add_output(outputs[0], logits)
    g.add_output(outputs[1], next_token)
    for s in outputs[2:]:
        g.add_output(s, s.name)
    return g.model(doc="GPT-2, fused layout with an in-place KV cache (gpt2onnx)")
