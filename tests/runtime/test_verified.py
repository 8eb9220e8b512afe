"""Verification on load: a file is hashed until it matches its manifest, then skipped
while its stat stamp is unchanged; any write to it (even one that restores mtime) makes
the next load hash it again; "full" always hashes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import gpt2onnx.runtime.folder as folder_mod
from gpt2onnx.contract import MANIFEST_FILE
from gpt2onnx.errors import InvalidParameterError, ModelFolderError
from gpt2onnx.runtime import Model, verified
from gpt2onnx.runtime.folder import open_manifest
from gpt2onnx.runtime.verified import CACHE_DIR_ENV, RECORD_FILE


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The files sha256_file reads, in a private cache folder."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_NS", 0)  # the copies below are seconds old at most
    calls: list[str] = []
    original = folder_mod.sha256_file

    def spy(path: Path) -> str:
        calls.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(folder_mod, "sha256_file", spy)
    return calls


@pytest.fixture
def copy(tiny_fused: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_fused, tmp_path / "model"))


def test_second_load_skips_unchanged_files(copy: Path, hashed: list[str],
                                           tmp_path: Path) -> None:
    files = set(json.loads((copy / MANIFEST_FILE).read_text())["files"])
    open_manifest(copy)
    assert set(hashed) == files
    record = json.loads((tmp_path / "cache" / RECORD_FILE).read_text())
    assert {Path(k).name for k in record} == files
    hashed.clear()
    open_manifest(copy)
    Model(copy)
    assert hashed == []
    open_manifest(copy, verify="full")
    assert set(hashed) == files
    hashed.clear()
    open_manifest(copy, verify=False)
    assert hashed == []


def test_any_write_is_hashed_again_and_caught(copy: Path, hashed: list[str]) -> None:
    open_manifest(copy)
    graph = copy / "model.onnx"
    before = graph.stat()
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    graph.write_bytes(bytes(data))
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back
    hashed.clear()
    with pytest.raises(ModelFolderError, match="does not match the sha256"):
        open_manifest(copy)
    assert "model.onnx" in hashed  # ctime moved, so the stamp no longer matched


def test_a_copied_folder_is_hashed_once_itself(copy: Path, hashed: list[str],
                                               tmp_path: Path) -> None:
    open_manifest(copy)
    other = Path(shutil.copytree(copy, tmp_path / "other"))
    hashed.clear()
    open_manifest(other)
    assert "model.onnx" in hashed


def test_unwritable_cache_still_verifies(copy: Path, monkeypatch: pytest.MonkeyPatch,
                                         hashed: list[str], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker))
    open_manifest(copy)
    first = len(hashed)
    open_manifest(copy)
    assert first > 0 and len(hashed) == 2 * first  # nothing recorded: hashed each time


def test_a_corrupt_record_is_ignored(copy: Path, hashed: list[str], tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / RECORD_FILE).write_text("{not json")
    open_manifest(copy)
    assert hashed
    hashed.clear()
    open_manifest(copy)
    assert hashed == []  # rewritten whole


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, "FULL"])
def test_bad_verify_value(copy: Path, bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="verify must be True, False or 'full'"):
        open_manifest(copy, verify=bad)  # type: ignore[arg-type]


def test_a_file_changed_while_hashed_is_not_recorded(copy: Path, hashed: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncated right after its hash matched (a copy over a folder being loaded): the
    stamp moved, so nothing vouches for the damaged file and the next load catches it."""
    original = folder_mod.sha256_file

    def hash_then_truncate(path: Path) -> str:
        digest = original(path)
        if Path(path).name == "model.onnx":
            with open(path, "r+b") as handle:
                handle.truncate(10)
        return digest

    monkeypatch.setattr(folder_mod, "sha256_file", hash_then_truncate)
    open_manifest(copy)  # this load saw the intact bytes
    monkeypatch.setattr(folder_mod, "sha256_file", original)
    with pytest.raises(ModelFolderError, match="does not match the sha256"):
        open_manifest(copy)


def test_a_file_written_just_now_is_hashed_again(copy: Path, hashed: list[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verified, "RACY_NS", 3600 * 10**9)  # everything counts as "just now"
    open_manifest(copy)
    first = len(hashed)
    open_manifest(copy)
    assert first > 0 and len(hashed) == 2 * first


def test_no_home_folder_means_no_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert verified.cache_dir() is None
    record = verified.VerifiedFiles()
    record.save()  # nothing to write to, and no error
    assert record.path is None
