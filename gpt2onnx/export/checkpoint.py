"""Load a Hugging Face GPT-2 checkpoint and turn it into plain numpy weights + a spec.

torch and transformers are imported inside the functions that need them, so that
importing the exporter's CLI (for --help) stays quick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpt2onnx.errors import ModelFolderError, UnsupportedConfigError

# activation_function values of GPT2Config that the graphs reproduce exactly.
# The tanh approximations are one formula under four names in transformers' ACT2FN.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate")
ACTIVATIONS = (*TANH_GELUS, "gelu", "relu", "silu", "swish", "quick_gelu", "tanh",
               "sigmoid", "linear")


@dataclass(frozen=True)
class ModelSpec:
    """The math-relevant fields of a GPT2Config, checked once."""

    n_layer: int
    n_head: int
    n_embd: int
    n_inner: int
    n_positions: int
    vocab_size: int
    activation: str
    layer_norm_epsilon: float
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    reorder_and_upcast_attn: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def attn_scale(self, layer: int) -> float:
        """Softmax scale of one layer, as GPT2Attention computes it."""
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
        return scale


def spec_from_config(config: Any) -> ModelSpec:
    """Check a GPT2Config and keep what changes the math.

    Raises:
        UnsupportedConfigError: a field the graph cannot reproduce exactly.
    """
    model_type = getattr(config, "model_type", None)
    if model_type != "gpt2":
        raise UnsupportedConfigError(
            f"model_type is {model_type!r}; gpt2onnx exports GPT-2 (model_type 'gpt2') "
            "checkpoints only (gpt2, distilgpt2, gpt2-medium/large/xl, DialoGPT, fine-tunes)."
        )
    if config.n_embd % config.n_head != 0:
        raise UnsupportedConfigError(
            f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}; "
            "GPT-2 attention needs n_embd = n_head x head_dim."
        )
    activation = config.activation_function
    if activation not in ACTIVATIONS:
        raise UnsupportedConfigError(
            f"activation_function={activation!r} is not supported; supported: "
            f"{', '.join(ACTIVATIONS)}."
        )
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedConfigError(
            "add_cross_attention=True (GPT-2 as an encoder-decoder's decoder) is not supported; "
            "export a decoder-only GPT2LMHeadModel."
        )
    eos = config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return ModelSpec(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        n_inner=config.n_inner if config.n_inner is not None else 4 * config.n_embd,
        n_positions=config.n_positions,
        vocab_size=config.vocab_size,
        activation=activation,
        layer_norm_epsilon=float(config.layer_norm_epsilon),
        scale_attn_weights=bool(config.scale_attn_weights),
        scale_attn_by_inverse_layer_idx=bool(config.scale_attn_by_inverse_layer_idx),
        reorder_and_upcast_attn=bool(config.reorder_and_upcast_attn),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=config.pad_token_id,
    )


@dataclass
class LayerWeights:
    ln_1_w: np.ndarray
    ln_1_b: np.ndarray
    attn_w: np.ndarray  # [n_embd, 3 * n_embd] (Conv1D orientation: x @ w)
    attn_b: np.ndarray
    attn_proj_w: np.ndarray  # [n_embd, n_embd]
    attn_proj_b: np.ndarray
    ln_2_w: np.ndarray
    ln_2_b: np.ndarray
    fc_w: np.ndarray  # [n_embd, n_inner]
    fc_b: np.ndarray
    fc_proj_w: np.ndarray  # [n_inner, n_embd]
    fc_proj_b: np.ndarray


@dataclass
class Weights:
    wte: np.ndarray  # [vocab, n_embd]; also the LM head when tied
    wpe: np.ndarray  # [n_positions, n_embd]
    layers: list[LayerWeights] = field(default_factory=list)
    ln_f_w: np.ndarray | None = None
    ln_f_b: np.ndarray | None = None
    lm_head: np.ndarray | None = None  # [vocab, n_embd]; None when tied to wte


def _in_out(module: Any) -> np.ndarray:
    """Weight as [in, out]: GPT-2's Conv1D already is; an nn.Linear stores [out, in]."""
    w = module.weight.detach().float().cpu().numpy()
    return w if type(module).__name__ == "Conv1D" else w.T


def _vec(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def weights_from_model(model: Any) -> Weights:
    """Pull every weight of a GPT2LMHeadModel into fp32 numpy arrays."""
    tr = model.transformer
    weights = Weights(wte=_vec(tr.wte.weight), wpe=_vec(tr.wpe.weight),
                      ln_f_w=_vec(tr.ln_f.weight), ln_f_b=_vec(tr.ln_f.bias))
    for block in tr.h:
        weights.layers.append(LayerWeights(
            ln_1_w=_vec(block.ln_1.weight), ln_1_b=_vec(block.ln_1.bias),
            attn_w=_in_out(block.attn.c_attn), attn_b=_vec(block.attn.c_attn.bias),
            attn_proj_w=_in_out(block.attn.c_proj), attn_proj_b=_vec(block.attn.c_proj.bias),
            ln_2_w=_vec(block.ln_2.weight), ln_2_b=_vec(block.ln_2.bias),
            fc_w=_in_out(block.mlp.c_fc), fc_b=_vec(block.mlp.c_fc.bias),
            fc_proj_w=_in_out(block.mlp.c_proj), fc_proj_b=_vec(block.mlp.c_proj.bias),
        ))
    # Tied or not is decided by the storage, which is what the PyTorch model computes with.
    head = model.lm_head.weight
    if head.data_ptr() != tr.wte.weight.data_ptr():
        weights.lm_head = _vec(head)
    return weights


def load_model(source: str | Path) -> tuple[Any, ModelSpec]:
    """Load a GPT2LMHeadModel in fp32, eval mode, from a local folder or a hub id.

    Raises:
        ModelFolderError: the source is not a loadable GPT-2 checkpoint.
        UnsupportedConfigError: the config uses something the exporter cannot reproduce.
    """
    import torch
    from transformers import AutoConfig, GPT2LMHeadModel

    src = str(source)
    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as exc:
        hint = ("a local folder with config.json and model weights" if Path(src).exists()
                else "a local checkpoint folder or a Hugging Face hub id such as 'gpt2'")
        raise ModelFolderError(f"cannot load a config from {src!r}: {exc}. SOURCE must be "
                               f"{hint}.") from exc
    spec = spec_from_config(config)
    # eager attention: the reference whose math the graphs reproduce operation by operation.
    config._attn_implementation = "eager"
    try:
        model = GPT2LMHeadModel.from_pretrained(src, config=config)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"cannot load GPT-2 weights from {src!r}: {exc}") from exc
    model = model.to(torch.float32).eval()
    return model, spec
