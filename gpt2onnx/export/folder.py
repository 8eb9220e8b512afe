"""Write a model folder atomically: build in a temporary sibling, move into place at the end.

A failed export (or a failed validation) leaves nothing that looks like a model folder.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from gpt2onnx.contract import GRAPH_FILE, MANIFEST_FILE, TOKENIZER_FILE, sha256_file
from gpt2onnx.errors import ModelFolderError

# protobuf cannot serialize a message over 2 GB: bigger graphs (gpt2-xl) keep their
# weights in one external data file next to the graph.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


def check_destination(out_dir: Path) -> None:
    """Refuse to replace a folder that is not a model folder (it may be the user's data)."""
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).exists())):
        raise ModelFolderError(
            f"{out_dir} exists and is not a gpt2onnx model folder; refusing to overwrite it. "
            "Choose another OUT_DIR or remove it.")


@contextlib.contextmanager
def staging_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir``; removed on error, moved into place by
    ``publish``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out_dir: Path) -> None:
    """Swap the finished folder into place (an older export there is replaced)."""
    check_destination(out_dir)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
