"""The manifest's schema: every field's type, range and consistency, checked before the
runtime trusts a number from it (a tampered ``max_length`` once asked numpy for 931 TiB)
or opens a path it names.

Paths are checked lexically here (relative, no ``..``, no absolute or drive paths); the
runtime then resolves them against the folder (symlinks included) before it opens any.
Standard library only, like ``gpt2onnx.contract``: the runtime stays light.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from gpt2onnx.contract import (
    GRAPH_FILE,
    LAYOUT_FUSED,
    LAYOUTS,
    LOGITS_INDEX,
    PRECISIONS,
    READABLE_FORMAT_VERSIONS,
    TOKENIZER_FILE,
    Manifest,
    fused_io,
    standard_io,
)
from gpt2onnx.errors import ModelFolderError

PROVIDERS = ("any", "cpu", "cuda")
CACHE_DTYPES = ("float32", "float16")
REEXPORT = "re-export the folder (`python -m gpt2onnx.export SOURCE OUT_DIR`)"
# Generous bounds, far past any GPT-2: they exist so that no edited number can make the
# runtime allocate or loop without limit before the graph itself is consulted.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 20
MAX_FILES = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Schema:
    """Checks one JSON object field by field; every failure names the field, the value,
    what is allowed and ``fix``."""

    def __init__(self, data: dict[str, Any], where: str, fix: str = REEXPORT) -> None:
        self.data, self.where, self.fix = data, where, fix

    def fail(self, name: str, allowed: str) -> ModelFolderError:
        shown = _short(repr(self.data.get(name))) if name in self.data else "missing"
        return ModelFolderError(f"{self.where}: {name} is {shown}, expected {allowed}; the "
                                f"folder is corrupt or was edited: {self.fix}.")

    def integer(self, name: str, lo: int, hi: int, default: int | None = None) -> int:
        value = self.data.get(name, default)
        # bool is an int subclass in Python, but `true` is no layer count.
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.fail(name, f"an integer in [{lo}, {hi}]")
        return value

    def optional_integer(self, name: str, lo: int, hi: int) -> int | None:
        if self.data.get(name) is None:
            return None
        try:
            return self.integer(name, lo, hi)
        except ModelFolderError:
            raise self.fail(name, f"null or an integer in [{lo}, {hi}]") from None

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = self.data.get(name)
        if not isinstance(value, str) or value not in allowed:
            raise self.fail(name, f"one of {list(allowed)}")
        return value

    def text(self, name: str, default: str = "") -> str:
        value = self.data.get(name, default)
        if not isinstance(value, str):
            raise self.fail(name, "a string")
        return value

    def names(self, name: str, expected: list[str], of: str) -> list[str]:
        """``expected`` exactly: the IO names that follow from ``of`` (layout, n_layer)."""
        value = self.data.get(name)
        if value == expected:
            return list(expected)
        if isinstance(value, list) and all(isinstance(n, str) for n in value):
            extra = [n for n in value if n not in expected]
            missing = [n for n in expected if n not in value]
            raise ModelFolderError(
                f"{self.where}: {name} lists unexpected {_short(repr(extra))} and lacks "
                f"{_short(repr(missing))}; {of} has exactly {len(expected)} {name} "
                f"({_short(repr(expected))}). The folder is corrupt or was edited: "
                f"{self.fix}.")
        raise self.fail(name, f"the {len(expected)} IO names of {of}")

    def path(self, name: str, default: str) -> str:
        value = self.data.get(name, default)
        if not is_safe_relative(value):
            raise self.fail(name, "a relative path inside the folder (no '..', not absolute)")
        return value

    def optional_path(self, name: str) -> str | None:
        return None if self.data.get(name) is None else self.path(name, "")

    def files(self, name: str = "files") -> dict[str, str]:
        value = self.data.get(name)
        if not isinstance(value, dict) or not 1 <= len(value) <= MAX_FILES:
            raise self.fail(name, f"an object of 1 to {MAX_FILES} relative path -> sha256 "
                                  "entries")
        for rel, digest in value.items():
            if not is_safe_relative(rel):
                raise ModelFolderError(
                    f"{self.where}: {name} lists {_short(repr(rel))}, expected a relative "
                    f"path inside the folder (no '..', not absolute); {self.fix}.")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise ModelFolderError(
                    f"{self.where}: {name}[{_short(repr(rel))}] is {_short(repr(digest))}, "
                    f"expected 64 lowercase hex digits (a sha256); {self.fix}.")
        return dict(value)


def is_safe_relative(value: object) -> bool:
    """Whether ``value`` is a relative POSIX path that cannot leave its folder by its
    spelling alone (symlinks are the reader's to resolve)."""
    if not isinstance(value, str) or not value or len(value) > 1024:
        return False
    if "\\" in value or "\x00" in value or ":" in value.split("/", 1)[0]:
        return False  # Windows separators and drives, NUL: never written by the exporter
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts and path.parts != ()


def parse_manifest(data: object, where: str, fix: str = REEXPORT, hashed: bool = True
                   ) -> Manifest:
    """A ``Manifest`` from decoded JSON, or ModelFolderError naming the first bad field.

    Unknown keys are ignored (a newer exporter may add some). ``hashed=False``: a folder
    without file hashes (an optimum export described by its config.json)."""
    if not isinstance(data, dict):
        raise ModelFolderError(f"{where} must hold a JSON object, got "
                               f"{type(data).__name__}; {fix}.")
    s = Schema(data, where, fix)
    version = data.get("format_version")
    if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
        raise ModelFolderError(
            f"{where} has format_version {_short(repr(version))}; this gpt2onnx reads "
            f"versions {list(READABLE_FORMAT_VERSIONS)}. Re-export the folder with this "
            "version of gpt2onnx.")
    layout = s.choice("layout", LAYOUTS)
    n_layer = s.integer("n_layer", 1, MAX_LAYERS)
    n_head = s.integer("n_head", 1, MAX_HEADS)
    head_dim = s.integer("head_dim", 1, MAX_HEAD_DIM)
    n_embd = s.integer("n_embd", n_head * head_dim, n_head * head_dim)
    vocab = s.integer("vocab_size", 2, MAX_VOCAB)
    context = s.integer("context_length", 2, MAX_CONTEXT)
    # The fused cache is sized from max_length, so it must exist and fit the positions.
    max_length = (s.integer("max_length", 2, context) if layout == LAYOUT_FUSED
                  else s.optional_integer("max_length", 2, context))
    cache_dtype = s.choice("cache_dtype", CACHE_DTYPES)
    io = fused_io if layout == LAYOUT_FUSED else standard_io
    ins, outs = io(n_layer, n_head, head_dim, vocab, cache_dtype)
    in_names = [t.name for t in ins]
    if layout == LAYOUT_FUSED and version == 1:
        in_names.remove(LOGITS_INDEX)  # format 1 had no logits_index input
    of = f"the {layout} layout with n_layer {n_layer} (format {version})"
    return Manifest(
        layout=layout, precision=s.choice("precision", PRECISIONS),
        provider=s.choice("provider", PROVIDERS), n_layer=n_layer, n_head=n_head,
        head_dim=head_dim, n_embd=n_embd, vocab_size=vocab, context_length=context,
        bos_token_id=s.optional_integer("bos_token_id", 0, vocab - 1),
        eos_token_id=s.optional_integer("eos_token_id", 0, vocab - 1),
        pad_token_id=s.optional_integer("pad_token_id", 0, vocab - 1),
        cache_dtype=cache_dtype, inputs=s.names("inputs", in_names, of),
        outputs=s.names("outputs", [t.name for t in outs], of),
        graph_file=s.path("graph_file", GRAPH_FILE),
        tokenizer_file=s.path("tokenizer_file", TOKENIZER_FILE),
        files=s.files() if hashed else {},
        opset=s.integer("opset", 1, 1000, default=Manifest.opset),
        source=s.text("source"), exporter_version=s.text("exporter_version"),
        format_version=version, max_length=max_length,
        # The mixed graph came with format 2's logits_index; other folders have none.
        mixed_graph_file=(s.optional_path("mixed_graph_file")
                          if layout == LAYOUT_FUSED and version >= 2 else None),
    )


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
