"""``genai_config.json``: makes a standard-layout folder loadable by onnxruntime-genai.

onnxruntime-genai's model builder has no GPT-2, but its runtime drives any decoder graph
that a ``genai_config.json`` describes. The standard layout's IO (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.N.key/value`` in, ``logits`` and
``present.N.key/value`` out, a cache that grows by concatenation) is exactly what its
generic ``decoder`` model type expects, so ``onnxruntime_genai.Model(folder)`` generates
from our folder with no other change. The fused layout is not described: its in-place
cache and ``seqlens_k`` / ``logits_index`` inputs are ours alone.

The file is written from the manifest and listed (hashed) in it like every other file.
"""

from __future__ import annotations

from typing import Any

from gpt2onnx.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LAYOUT_STANDARD,
    LOGITS,
    POSITION_IDS,
    Manifest,
)

GENAI_CONFIG_FILE = "genai_config.json"
# The generic decoder type of onnxruntime-genai (checked with 0.18): it takes its IO names
# from this file rather than from a builder's model family.
GENAI_MODEL_TYPE = "decoder"


def genai_config(manifest: Manifest) -> dict[str, Any] | None:
    """The onnxruntime-genai description of a standard-layout folder (None for fused).

    Search defaults are greedy with the full context as ``max_length``, as transformers'
    ``generate`` would run this checkpoint with no generation settings; callers override
    them per request with ``GeneratorParams.set_search_options``.
    """
    if manifest.layout != LAYOUT_STANDARD:
        return None
    eos = manifest.eos_token_id
    pad = manifest.pad_token_id if manifest.pad_token_id is not None else eos
    model: dict[str, Any] = {
        "type": GENAI_MODEL_TYPE,
        "vocab_size": manifest.vocab_size,
        "context_length": manifest.context_length,
        "decoder": {
            "filename": manifest.graph_file,
            "head_size": manifest.head_dim,
            "hidden_size": manifest.n_embd,
            "num_attention_heads": manifest.n_head,
            "num_key_value_heads": manifest.n_head,
            "num_hidden_layers": manifest.n_layer,
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "inputs": {
                "input_ids": INPUT_IDS,
                "attention_mask": ATTENTION_MASK,
                "position_ids": POSITION_IDS,
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": LOGITS,
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
        },
    }
    # genai wants integer ids; a checkpoint without EOS (or BOS) simply never stops on one.
    for key, value in (("bos_token_id", manifest.bos_token_id), ("eos_token_id", eos),
                       ("pad_token_id", pad)):
        if value is not None:
            model[key] = value
    return {
        "model": model,
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1,
            "max_length": manifest.context_length, "min_length": 0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0, "early_stopping": True, "past_present_share_buffer": False,
        },
    }
