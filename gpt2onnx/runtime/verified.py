"""Remember which model files already matched their manifest, so that reloading an
unchanged folder does not hash it again.

Hashing the 500 MB fp32 gpt2 graph takes 0.6-1.2 s on the bench machine, most of a
process's start-up. Like git's index, a file counts as unchanged while its stat stamp
(device, inode, size, mtime and ctime in ns) equals the stamp recorded when its sha256
last matched the manifest's digest. Writing, truncating, replacing or copying a file
changes the stamp, and no ordinary tool can set ctime back, so all of these are
rehashed. A stamp is recorded only if the file did not change while it was hashed and
was last written more than 2 s before (so a coarse timestamp cannot hide a later write).
Corruption that leaves the metadata alone (a failing disk) is not caught:
``verify="full"`` rehashes every file on every load.

The record lives in the user's cache folder (``$GPT2ONNX_CACHE_DIR``, else
``$XDG_CACHE_HOME/gpt2onnx``, else ``~/.cache/gpt2onnx``), not in the model folder,
which may be read-only. If it cannot be read or written, every load hashes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("gpt2onnx.runtime")

CACHE_DIR_ENV = "GPT2ONNX_CACHE_DIR"
RECORD_FILE = "verified-files.json"
MAX_ENTRIES = 512  # oldest dropped first: a record, not an archive


# A file changed this recently may change again within one timestamp tick without its
# stamp moving (coarse clocks on some filesystems): it is hashed, not recorded ("racy
# clean" in git's words).
RACY_NS = 2_000_000_000


def cache_dir() -> Path | None:
    """The record's folder, or None when there is no place for it (no home folder)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "gpt2onnx"
    try:
        return Path.home() / ".cache" / "gpt2onnx"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers)
        return None


def stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class VerifiedFiles:
    """The record of files whose digest matched, keyed by absolute path."""

    def __init__(self, directory: Path | None = None) -> None:
        folder = directory or cache_dir()
        self.path = folder / RECORD_FILE if folder is not None else None
        self._entries: dict[str, dict[str, object]] = {}
        self._dirty = False
        if self.path is None:
            return
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self._entries = data
        except (OSError, ValueError):
            pass  # no record yet, or unreadable: hash everything

    def unchanged(self, path: Path, digest: str) -> bool:
        """Whether ``path`` matched ``digest`` before and its stamp has not changed."""
        try:
            key, now = str(path.resolve()), stamp(path)
        except OSError:
            return False
        entry = self._entries.get(key)
        return isinstance(entry, dict) and entry.get("sha256") == digest and entry.get(
            "stamp") == now

    def record(self, path: Path, digest: str, before: list[int]) -> None:
        """Remember that ``path`` matched ``digest``. ``before`` is its stamp from before it
        was hashed: if the file changed while it was read, or too recently for its stamp
        to tell the next change apart, nothing is recorded and the next load hashes it."""
        try:
            after = stamp(path)
        except OSError:
            return
        newest = max(after[3], after[4])  # mtime_ns, ctime_ns
        if after != before or time.time_ns() - newest < RACY_NS:
            return
        key = str(path.resolve())
        self._entries.pop(key, None)  # re-insert: newest last
        self._entries[key] = {"sha256": digest, "stamp": after}
        self._dirty = True

    def save(self) -> None:
        """Write the record atomically; a failure only costs a rehash next time."""
        if not self._dirty or self.path is None:
            return
        entries = dict(list(self._entries.items())[-MAX_ENTRIES:])
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=self.path.parent)
            with os.fdopen(fd, "w") as handle:
                json.dump(entries, handle)
            os.replace(tmp, self.path)
            tmp = None
            self._dirty = False
        except OSError as exc:
            log.debug("could not write %s (%s): the next load hashes again", self.path, exc)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
