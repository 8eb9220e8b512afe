"""The model folder: the only contract between the exporter and the runtime.

This module owns the IO names, their axes and the manifest schema. The exporter
writes a folder with it, the runtime reads one with it; neither imports the other.
It depends on the standard library only, so the runtime stays light.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gpt2onnx.errors import ModelFolderError

# 2: the fused graph takes ``logits_index`` and returns logits [batch, kept, vocab].
# Version 1 folders (logits for each row's last token only) still load and generate.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "export_report.json"
GRAPH_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"

LAYOUT_STANDARD = "standard"
LAYOUT_FUSED = "fused"
LAYOUTS = (LAYOUT_STANDARD, LAYOUT_FUSED)
PRECISIONS = ("fp32", "fp16", "int8", "int4")

# Names shared with optimum and transformers.js so their folders and ours interchange.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# Fused layout only: per-row cache length bookkeeping for GroupQueryAttention and a
# device-side argmax so greedy decoding never copies logits to the host.
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
NEXT_TOKEN = "next_token"
# Fused layout, format 2: [batch, kept] int64 positions within this step (0 = the step's
# first new token) whose logits the graph computes; the LM head runs on those alone.
LOGITS_INDEX = "logits_index"


def past_name(layer: int, kind: str) -> str:
    """``past_key_values.{layer}.key`` / ``.value``."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """``present.{layer}.key`` / ``.value``."""
    return f"present.{layer}.{kind}"


def cache_names(n_layer: int) -> list[tuple[str, str]]:
    """(past input, present output) pairs in graph order: layer 0 key, layer 0 value, ..."""
    return [
        (past_name(i, kind), present_name(i, kind))
        for i in range(n_layer)
        for kind in ("key", "value")
    ]


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and symbolic shape of one graph input or output."""

    name: str
    dtype: str  # numpy dtype name: "int64", "int32", "float32", "float16"
    shape: tuple[str | int, ...]


def standard_io(n_layer: int, n_head: int, head_dim: int, vocab: int, cache_dtype: str
                ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """IO of the standard layout: present = concat(past, new); logits for every position."""
    inputs = [
        TensorSpec(INPUT_IDS, "int64", ("batch", "seq")),
        TensorSpec(ATTENTION_MASK, "int64", ("batch", "total_seq")),
        TensorSpec(POSITION_IDS, "int64", ("batch", "seq")),
    ]
    outputs = [TensorSpec(LOGITS, cache_dtype_logits(cache_dtype), ("batch", "seq", vocab))]
    for past, present in cache_names(n_layer):
        inputs.append(TensorSpec(past, cache_dtype, ("batch", n_head, "past_seq", head_dim)))
        outputs.append(TensorSpec(present, cache_dtype, ("batch", n_head, "total_seq", head_dim)))
    return inputs, outputs


def fused_io(n_layer: int, n_head: int, head_dim: int, vocab: int, cache_dtype: str
             ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """IO of the fused layout: past and present share one [batch, heads, max_length, dim]
    buffer per layer (updated in place), rows are right-padded and carry their own
    cache length in ``seqlens_k``; logits only at the positions ``logits_index`` names."""
    inputs = [
        TensorSpec(INPUT_IDS, "int64", ("batch", "seq")),
        TensorSpec(POSITION_IDS, "int64", ("batch", "seq")),
        TensorSpec(SEQLENS_K, "int32", ("batch",)),
        TensorSpec(TOTAL_SEQUENCE_LENGTH, "int32", ()),
        TensorSpec(LOGITS_INDEX, "int64", ("batch", "kept")),
    ]
    outputs = [
        TensorSpec(LOGITS, cache_dtype_logits(cache_dtype), ("batch", "kept", vocab)),
        TensorSpec(NEXT_TOKEN, "int64", ("batch", "kept")),
    ]
    for past, present in cache_names(n_layer):
        inputs.append(TensorSpec(past, cache_dtype, ("batch", n_head, "max_length", head_dim)))
        outputs.append(TensorSpec(present, cache_dtype, ("batch", n_head, "max_length", head_dim)))
    return inputs, outputs


def cache_dtype_logits(cache_dtype: str) -> str:
    # Logits always leave the graph in fp32: sampling and log-probs need the precision.
    del cache_dtype
    return "float32"


@dataclass
class Manifest:
    """Everything the runtime needs to load a folder, and nothing it must guess."""

    layout: str
    precision: str
    provider: str  # what the folder is built for: "any" (standard ops), "cpu", "cuda"
    n_layer: int
    n_head: int
    head_dim: int
    n_embd: int
    vocab_size: int
    context_length: int  # n_positions: the longest text the model can see
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    cache_dtype: str
    inputs: list[str]
    outputs: list[str]
    graph_file: str = GRAPH_FILE
    tokenizer_file: str = TOKENIZER_FILE
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    opset: int = 17
    source: str = ""
    exporter_version: str = ""
    format_version: int = FORMAT_VERSION
    # Fused layout: the cache's sequence capacity (<= context_length).
    max_length: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, folder: Path) -> None:
        (folder / MANIFEST_FILE).write_text(self.to_json())

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_FILE
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelFolderError(
                f"{path} does not exist. Export a model folder first: "
                "`python -m gpt2onnx.export SOURCE OUT_DIR`."
            ) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFolderError(
                f"{path} is not valid JSON ({exc}); the folder is corrupt. Re-export it."
            ) from exc
        if not isinstance(data, dict):
            raise ModelFolderError(f"{path} must hold a JSON object; re-export the folder.")
        version = data.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ModelFolderError(
                f"{path} has format_version {version!r}; this gpt2onnx reads versions "
                f"{list(READABLE_FORMAT_VERSIONS)}. Re-export the folder with this version of "
                "gpt2onnx."
            )
        known = {f.name for f in fields(cls)}
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        missing = sorted(required - data.keys())
        if missing:
            raise ModelFolderError(f"{path} lacks {missing}; re-export the folder.")
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        if manifest.layout not in LAYOUTS:
            raise ModelFolderError(
                f"{path}: layout {manifest.layout!r} is not one of {LAYOUTS}; re-export."
            )
        return manifest

    def last_position_only(self, wanted: str) -> str:
        """Why a format-1 folder cannot give ``wanted`` (logits past the last position),
        and the fix."""
        return (f"this model folder (format 1) returns logits for the last position only, "
                f"so {wanted} is unavailable; re-export it with this version of gpt2onnx "
                "(`python -m gpt2onnx.export`).")

    @property
    def any_logits(self) -> bool:
        """Whether the graph returns logits at any positions asked for (fused format 2,
        and the standard layout, which returns every position); fused format-1 folders
        return each row's last position only."""
        return self.layout == LAYOUT_STANDARD or LOGITS_INDEX in self.inputs


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
