"""Write the files of a model folder (the staging and swapping is in destination.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from gpt2onnx.contract import GRAPH_FILE, MIXED_GRAPH_FILE, TOKENIZER_FILE, sha256_file
from gpt2onnx.errors import ModelFolderError
from gpt2onnx.export import head_parts
from gpt2onnx.export.destination import current_umask

# protobuf cannot serialize a message over 2 GB: bigger graphs (gpt2-xl) keep their
# weights in one external data file next to the graph.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


def save_graph(model: onnx.ModelProto, folder: Path,
               mixed: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
               split_head: bool = False) -> list[str]:
    """Save the graph (external data past 2 GB, or when a second graph shares the
    weights); return the files written. ``mixed`` makes the mixed graph from the saved
    one, whose initializers are then references into the one data file. ``split_head``
    (CPU folders): an external fp32 LM head becomes row ranges of its table
    (head_parts.py), in both graphs."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    path = folder / GRAPH_FILE
    if size <= EXTERNAL_DATA_THRESHOLD and mixed is None:
        onnx.save_model(model, str(path))
        return [GRAPH_FILE]
    # Saving moves every big initializer's bytes into the data file and leaves a
    # reference in ``model`` (onnx clears raw_data), so the mixed graph copies references.
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE,
                    size_threshold=1024)
    files = [GRAPH_FILE, EXTERNAL_DATA_FILE]
    # onnx creates the data file owner-only; it gets the modes of the folder's other files.
    (folder / EXTERNAL_DATA_FILE).chmod(0o666 & ~current_umask())
    if split_head:
        # Only now do the table's bytes have an offset in the data file to point into.
        onnx.save_model(head_parts.split_head(model), str(path))
    if mixed is not None:
        onnx.save_model(mixed(model), str(folder / MIXED_GRAPH_FILE))
        files.append(MIXED_GRAPH_FILE)
    return files


def save_tokenizer(tokenizer: Any, folder: Path) -> list[str]:
    """Save a transformers fast tokenizer; tokenizer.json is what the runtime reads."""
    tokenizer.save_pretrained(str(folder))
    if not (folder / TOKENIZER_FILE).exists():
        raise ModelFolderError(
            "the checkpoint's tokenizer has no fast (tokenizer.json) form; pass --tokenizer "
            "with a folder or hub id that has one (e.g. 'gpt2').")
    return [f for f in TOKENIZER_FILES if (folder / f).exists()]


def hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in sorted(set(names))}
