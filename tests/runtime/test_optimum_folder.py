"""A folder exported by optimum-cli itself runs in our runtime with the same tokens, and a
bad config.json in such a folder is a ModelFolderError naming the field."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gpt2onnx.errors import ModelFolderError
from gpt2onnx.runtime import GenerationParams, Model
from tests.peer_venv import PEER_CLI, requires_peer


@requires_peer
def test_optimum_cli_folder_generates_our_tokens(tiny_checkpoint, tiny_fused, tmp_path):
    out = tmp_path / "optimum"
    proc = subprocess.run([str(PEER_CLI), "export", "onnx", "--model", str(tiny_checkpoint),
                           "--task", "text-generation-with-past", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = Model(out)
    assert theirs.manifest.layout == "standard" and theirs.manifest.source.startswith("optimum")
    params = GenerationParams(max_new_tokens=12, stop_on_eos=False)
    prompts = ["Hello world", "The quick brown fox"]
    ours = [r.token_ids for r in Model(tiny_fused).generate_batch(prompts, params)]
    assert [r.token_ids for r in theirs.generate_batch(prompts, params)] == ours


# Optimum-style folders without the peer venv: our standard graph has optimum's IO names,
# so model.onnx + tokenizer.json + the checkpoint's config.json is such a folder.


@pytest.fixture
def optimum_like(tiny_checkpoint: Path, tiny_standard: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "optimum"
    folder.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copy(tiny_standard / name, folder / name)
    shutil.copy(tiny_checkpoint / "config.json", folder / "config.json")
    return folder


def _config(folder: Path, **edits: Any) -> Path:
    config = json.loads((folder / "config.json").read_text())
    for key, value in edits.items():
        if value is None and key.startswith("drop_"):
            config.pop(key[len("drop_"):])
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_optimum_style_folder_generates_our_tokens(optimum_like: Path,
                                                      tiny_standard: Path) -> None:
    theirs = Model(optimum_like)
    assert theirs.manifest.source.startswith("optimum")
    assert theirs.manifest.context_length == 128 and theirs.manifest.files == {}
    params = GenerationParams(max_new_tokens=6, stop_on_eos=False)
    assert (theirs.generate("Hello world", params).token_ids
            == Model(tiny_standard).generate("Hello world", params).token_ids)


BAD_CONFIGS = [
    *[({f"drop_{k}": None}, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size",
                                          "n_positions")],
    *[({k: v}, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")
      for v in ("2", -4, None, True)],
    ({"n_embd": 66}, "multiple of n_head"), ({"n_layer": 3}, "present.2.key"),
    ({"eos_token_id": 60000}, "eos_token_id"), ({"n_positions": 4096}, "4096"),
    ({"n_embd": 128}, "model.onnx"),
]


@pytest.mark.parametrize(("edits", "named"), BAD_CONFIGS)
def test_a_bad_config_is_a_folder_error(optimum_like: Path, edits: dict[str, Any],
                                        named: str) -> None:
    with pytest.raises(ModelFolderError, match=r"config\.json|model\.onnx") as info:
        Model(_config(optimum_like, **edits))
    assert named in str(info.value)


@pytest.mark.parametrize("content", [b"[1, 2]", b"{n_layer", b"\xff\xfe", b'"gpt2"'])
def test_a_config_that_is_no_object_is_a_folder_error(optimum_like: Path,
                                                      content: bytes) -> None:
    (optimum_like / "config.json").write_bytes(content)
    with pytest.raises(ModelFolderError, match=r"config\.json"):
        Model(optimum_like)


def test_an_optimum_tokenizer_linked_from_outside_is_refused(optimum_like: Path,
                                                             tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    shutil.move(optimum_like / "tokenizer.json", outside)
    (optimum_like / "tokenizer.json").symlink_to(outside)
    with pytest.raises(ModelFolderError, match="outside the model folder"):
        Model(optimum_like)
