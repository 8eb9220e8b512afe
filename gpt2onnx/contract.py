"""The model folder: the only contract between the exporter and the runtime.

This module owns the IO names, their axes and the manifest schema. The exporter
writes a folder with it, the runtime reads one with it; neither imports the other.
It depends on the standard library only, so the runtime stays light.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
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


# Fused layout, optional second graph (``Manifest.mixed_graph_file``): the same weights and
# nodes, but every attention runs in two lanes over one concatenated token axis, so that
# one-token rows (lane 1: ``seqlens_k``, ``past_key_values.*``) and a prompt chunk (lane 2:
# the ``chunk.``-prefixed IO) share a single pass over the weights. ``input_ids``,
# ``position_ids`` and ``logits_index`` are then [1, tokens]: lane 1's rows first.
MIXED_GRAPH_FILE = "model_mixed.onnx"
CHUNK_PREFIX = "chunk."


def chunk_name(name: str) -> str:
    """Lane 2's name for a lane-1 input or output (``chunk.seqlens_k``, ...)."""
    return CHUNK_PREFIX + name


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


def mixed_io(n_layer: int, n_head: int, head_dim: int, vocab: int, cache_dtype: str
             ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """IO of the mixed graph: the fused IO with every token on one axis of a batch of 1,
    plus lane 2's lengths and cache views."""
    inputs, outputs = fused_io(n_layer, n_head, head_dim, vocab, cache_dtype)
    inputs[:2] = [TensorSpec(INPUT_IDS, "int64", (1, "tokens")),
                  TensorSpec(POSITION_IDS, "int64", (1, "tokens"))]
    inputs[2] = TensorSpec(SEQLENS_K, "int32", ("rows",))
    inputs[4] = TensorSpec(LOGITS_INDEX, "int64", (1, "kept"))
    outputs[:2] = [TensorSpec(LOGITS, outputs[0].dtype, (1, "kept", vocab)),
                   TensorSpec(NEXT_TOKEN, "int64", (1, "kept"))]
    cache_in = [s for s in inputs if s.name.startswith("past_key_values.")]
    cache_out = [s for s in outputs if s.name.startswith("present.")]
    inputs += [TensorSpec(chunk_name(SEQLENS_K), "int32", ("chunk_rows",)),
               TensorSpec(chunk_name(TOTAL_SEQUENCE_LENGTH), "int32", ())]
    inputs += [TensorSpec(chunk_name(s.name), s.dtype, ("chunk_rows", *s.shape[1:]))
               for s in cache_in]
    outputs += [TensorSpec(chunk_name(s.name), s.dtype, ("chunk_rows", *s.shape[1:]))
                for s in cache_out]
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
    # Fused layout, optional: the same graph with two attention lanes (MIXED_GRAPH_FILE),
    # for engines that run decode rows and prompt chunks in one run.
    mixed_graph_file: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, folder: Path) -> None:
        (folder / MANIFEST_FILE).write_text(self.to_json())

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        """Read ``folder/manifest.json`` and check it against the schema
        (``gpt2onnx.manifest_schema``): a typed ModelFolderError names the first bad field.
        The file must be a regular file inside the folder, at most MAX_MANIFEST_BYTES."""
        from gpt2onnx.manifest_schema import parse_manifest  # it imports this module

        path = Path(folder) / MANIFEST_FILE
        return parse_manifest(read_small_json(path, Path(folder)), str(path))

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


# Keys of the ONNX metadata_props the exporter writes into the graph itself, so the
# runtime can refuse a manifest edited to disagree with the graph (e.g. a longer
# context than the position table holds).
PROP_CONTEXT_LENGTH = "gpt2onnx.context_length"
PROP_VOCAB_SIZE = "gpt2onnx.vocab_size"
PROP_N_LAYER = "gpt2onnx.n_layer"
PROP_N_HEAD = "gpt2onnx.n_head"
PROP_HEAD_DIM = "gpt2onnx.head_dim"
PROP_LAYOUT = "gpt2onnx.layout"
PROP_PRECISION = "gpt2onnx.precision"


def graph_props(manifest: Manifest) -> dict[str, str]:
    """The shape facts the graph carries in its metadata_props (values are strings, as
    ONNX stores them); the runtime compares them with the manifest at load."""
    return {
        PROP_CONTEXT_LENGTH: str(manifest.context_length),
        PROP_VOCAB_SIZE: str(manifest.vocab_size),
        PROP_N_LAYER: str(manifest.n_layer),
        PROP_N_HEAD: str(manifest.n_head),
        PROP_HEAD_DIM: str(manifest.head_dim),
        # Labels too: a manifest edited to say int8 over an fp32 graph is refused.
        PROP_LAYOUT: manifest.layout,
        PROP_PRECISION: manifest.precision,
    }


MAX_MANIFEST_BYTES = 4 << 20  # a real manifest is ~1-2 KB; a huge one is not ours


def read_small_json(path: Path, folder: Path, limit: int = MAX_MANIFEST_BYTES) -> Any:
    """The decoded content of a small UTF-8 JSON file of the folder (or ModelFolderError
    naming the file and the fix): it must be a regular file inside
    ``folder`` (a symlink out is refused before it is opened) of at most ``limit`` bytes."""
    try:
        real = path.resolve()
        inside = real.is_relative_to(folder.resolve())
        regular = real.is_file()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ModelFolderError(f"{path} cannot be resolved ({exc}); re-export the folder."
                               ) from exc
    if not path.exists() and not path.is_symlink():
        raise ModelFolderError(f"{path} does not exist. Export a model folder first: "
                               "`python -m gpt2onnx.export SOURCE OUT_DIR`.")
    if not inside or not regular:
        raise ModelFolderError(
            f"{path} is not a regular file inside {folder} (a folder, a device, or a link "
            "out of it); the folder is corrupt or was edited: re-export it.")
    try:
        with open(real, "rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as exc:
        raise ModelFolderError(f"{path} could not be read ({exc}); check its permissions "
                               "or re-export the folder.") from exc
    if len(raw) > limit:
        raise ModelFolderError(f"{path} is over {limit} bytes, far larger than any manifest "
                               "gpt2onnx writes; the folder is corrupt: re-export it.")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, 5000-digit ints, nesting
        raise ModelFolderError(f"{path} is not valid JSON in UTF-8 ({exc}); the folder is "
                               "corrupt: re-export it.") from exc


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
