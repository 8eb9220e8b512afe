"""Write the files of a model folder (the staging and swapping is in destination.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from gpt2onnx.contract import GRAPH_FILE, TOKENIZER_FILE, sha256_file
from gpt2onnx.errors import ModelFolderError

# protobuf cannot serialize a message over 2 GB: bigger graphs (gpt2-xl) keep their
# weights in one external data file next to the graph.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


def save_graph(model: onnx.ModelProto, folder: Path) -> list[str]:
    """Save the graph (external data past 2 GB); return the files written."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    path = folder / GRAPH_FILE
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE,
                        size_threshold=1024)
        return [GRAPH_FILE, EXTERNAL_DATA_FILE]
    onnx.save_model(model, str(path))
    return [GRAPH_FILE]


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
