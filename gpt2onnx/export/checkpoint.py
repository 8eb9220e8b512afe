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
    _check_numbers(config)
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
    _check_special_ids(config)
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


# GPT2Config fields that size the graph: (name, smallest allowed value).
_SIZE_FIELDS = (("n_layer", 1), ("n_head", 1), ("n_embd", 1), ("n_positions", 2),
                ("vocab_size", 1))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(config: Any) -> None:
    """Types and ranges of the sizes, before any arithmetic on them."""
    for name, low in _SIZE_FIELDS:
        value = getattr(config, name, None)
        if not _is_int(value) or value < low:
            raise UnsupportedConfigError(
                f"config.json: {name}={value!r} must be an integer >= {low}; fix config.json "
                "(it does not describe a GPT-2 model gpt2onnx can build).")
    n_inner = getattr(config, "n_inner", None)
    if n_inner is not None and (not _is_int(n_inner) or n_inner < 1):
        raise UnsupportedConfigError(
            f"config.json: n_inner={n_inner!r} must be null or an integer >= 1; fix config.json.")
    eps = getattr(config, "layer_norm_epsilon", None)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
        raise UnsupportedConfigError(
            f"config.json: layer_norm_epsilon={eps!r} must be a number in (0, 1); fix "
            "config.json (GPT-2 uses 1e-05).")


def _check_special_ids(config: Any) -> None:
    """BOS/EOS/pad ids must be token ids of the model's vocabulary (or null)."""
    vocab = config.vocab_size
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        for token in value if isinstance(value, list) else [value]:
            if token is not None and (not _is_int(token) or not 0 <= token < vocab):
                raise UnsupportedConfigError(
                    f"config.json: {name}={value!r} is not a token id of the vocabulary "
                    f"[0, {vocab - 1}]; set it to a token id below vocab_size={vocab} or to "
                    "null.")


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
    check_local_source(src, "SOURCE", "the checkpoint folder (the one holding config.json)")
    try:
        config = AutoConfig.from_pretrained(src)
    # transformers raises OSError, ValueError, KeyError or huggingface_hub's strict
    # dataclass errors (a string where an int belongs) for a bad config.json.
    except Exception as exc:
        hint = ("a local folder with config.json and model weights" if Path(src).exists()
                else "a local checkpoint folder or a Hugging Face hub id such as 'gpt2'")
        raise ModelFolderError(f"cannot load a config from {src!r}: {_one_line(exc)}. "
                               f"SOURCE must be {hint}.") from exc
    spec = spec_from_config(config)
    # eager attention: the reference whose math the graphs reproduce operation by operation.
    config._attn_implementation = "eager"
    try:
        # ignore_mismatched_sizes: report every tensor whose shape differs from config.json
        # in loading_info (refused below, with the shapes) instead of a vague exception.
        model, info = GPT2LMHeadModel.from_pretrained(src, config=config,
                                                      output_loading_info=True,
                                                      ignore_mismatched_sizes=True)
    # A truncated or garbage weights file surfaces as SafetensorError, UnpicklingError,
    # RuntimeError (shapes that do not match the config) and more: all are the file's fault.
    except Exception as exc:
        raise ModelFolderError(
            f"cannot load GPT-2 weights from {src!r}: {_one_line(exc)}. The weights file "
            "(model.safetensors or pytorch_model.bin) is corrupt, truncated or does not "
            "match config.json; re-download or re-save the checkpoint.") from exc
    _check_loading_info(src, info)
    model = model.to(torch.float32).eval()
    return model, spec


# Hub ids are "name" or "org/name"; anything spelled like a path is a local path, which
# must exist (not 30 s of hub retries for a typo).
_PATH_PREFIXES = ("/", "./", "../", "~")


def check_local_source(src: str, flag: str, want: str) -> None:
    """Refuse at once a ``src`` that is a file, or spelled as a path that does not exist."""
    path = Path(src).expanduser()
    if path.exists() and not path.is_dir():
        raise ModelFolderError(f"{flag} {src!r} is a file; pass {want}.")
    if not path.exists() and (src in (".", "..") or src.startswith(_PATH_PREFIXES)):
        raise ModelFolderError(f"{flag} {src!r} does not exist; pass {want}, or a Hugging "
                               "Face hub id such as 'gpt2'.")


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """transformers' messages span lines (a report table, a field's validation error)."""
    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    if "weights_only" in text:
        # torch's advice (load with weights_only=False) would run the file's code: a file
        # that the safe unpickler refuses is simply not a checkpoint we read.
        return "not a readable PyTorch checkpoint (torch.load with weights_only=True refused it)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_loading_info(src: str, info: dict[str, Any]) -> None:
    """transformers fills weights the file lacks (or whose shape differs) with random
    values and only warns: an export of that would be silently wrong."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(_mismatch(k) for k in info.get("mismatched_keys") or [])
    # Tensors the file has and config.json does not ask for (more layers than n_layer):
    # dropped silently, the export would be another model. Old checkpoints' attention
    # buffers (attn.bias, attn.masked_bias: constants transformers rebuilds) are harmless.
    unexpected = sorted(k for k in info.get("unexpected_keys") or []
                        if not k.endswith((".attn.bias", ".attn.masked_bias")))
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (
            f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else "")
        raise ModelFolderError(
            f"the weights in {src!r} hold {len(unexpected)} tensor(s) config.json has no place "
            f"for ({shown}); the weights file does not match config.json. Fix n_layer in "
            "config.json (or re-save the checkpoint).")
    if missing or mismatched:
        what = missing or mismatched
        shown = ", ".join(what[:3]) + (f" and {len(what) - 3} more" if len(what) > 3 else "")
        problem = "lack" if missing else "have the wrong shape for"
        raise ModelFolderError(
            f"the weights in {src!r} {problem} {len(what)} tensor(s) config.json asks for "
            f"({shown}); the weights file does not match config.json. Fix n_layer/n_embd/"
            "vocab_size in config.json or re-save the checkpoint.")


def _mismatch(entry: Any) -> str:
    """``name (file shape vs config shape)`` for transformers' (name, file, model) triple."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        name, got, want = entry
        return f"{name} {tuple(got)} in the file, {tuple(want)} from config.json"
    return str(entry)
