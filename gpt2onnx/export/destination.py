"""Where an export may be written, and how it is swapped into place without losing anything.

The exporter replaces OUT_DIR only when it can prove OUT_DIR is one of its own earlier
exports: a manifest ``Manifest.load`` accepts, the export report we always write, and no
entry we would not have written. Anything else is the user's and is refused untouched.

The new folder is built in a staging sibling ``.NAME.partial-XXXX`` whose first file is a
marker naming the exporting process; the next export of the same OUT_DIR removes staging
folders whose process is gone (an export killed with SIGKILL cannot clean up after
itself) and ``.NAME.old-XXXX`` folders that are provably our exports.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gpt2onnx.contract import MANIFEST_FILE, REPORT_FILE, Manifest
from gpt2onnx.errors import ModelFolderError
from gpt2onnx.export.genai_config import GENAI_CONFIG_FILE

# Written first into every staging folder: "pid host"; proof that the folder is ours.
STAGING_MARKER = ".gpt2onnx-staging"
# Files an export writes besides the ones its manifest hashes (and genai_config.json, which
# older exports did not hash and users wrote by hand for onnxruntime-genai).
_UNHASHED_FILES = {MANIFEST_FILE, REPORT_FILE, STAGING_MARKER, GENAI_CONFIG_FILE}


def resolve_destination(out_dir: str | Path, source: str | Path | None = None) -> Path:
    """The folder to write for OUT_DIR ``out_dir``, checked before anything slow happens.

    A symlinked OUT_DIR is written through: the link's target receives the export and the
    link itself stays as it is.

    Raises:
        ModelFolderError: OUT_DIR holds something that is not our earlier export, is the
            current folder or one of its ancestors, overlaps SOURCE, or cannot be written.
    """
    given = Path(out_dir)
    out = given.resolve()
    if out == Path(out.anchor) or out == Path.cwd().resolve() or out in Path.cwd().resolve(
            ).parents:
        raise ModelFolderError(
            f"OUT_DIR {str(given)!r} is {out}, the current folder or one of its ancestors; "
            "an export replaces OUT_DIR as a whole. Name a new folder, e.g. ./model.")
    if source is not None and Path(source).exists():
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ModelFolderError(
                f"OUT_DIR {str(given)!r} ({out}) overlaps SOURCE {str(source)!r} ({src}); "
                "writing it would replace the checkpoint. Choose an OUT_DIR outside SOURCE.")
    check_replaceable(out, shown=given)
    _check_writable(out, shown=given)
    return out


def is_our_export(folder: Path) -> bool:
    """Whether ``folder`` is provably a model folder this exporter wrote (not a symlink)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if not (folder / REPORT_FILE).is_file() or (folder / MANIFEST_FILE).is_symlink():
        return False
    try:
        manifest = Manifest.load(folder)
    except (ModelFolderError, TypeError, ValueError, OSError):
        return False
    files = manifest.files if isinstance(manifest.files, dict) else {}
    expected = _UNHASHED_FILES | {str(name) for name in files}
    return all(entry.name in expected and entry.is_file() and not entry.is_symlink()
               for entry in folder.iterdir()) and edited_files(folder) is None


def edited_files(folder: Path) -> str | None:
    """Why the files of an earlier export are not the ones it wrote (a file edited by
    hand, or a corrupt copy), or None: each file's sha256 must still match its manifest
    (the runtime's check, which skips files whose stat stamp is unchanged since they last
    matched). Only then is replacing it deleting nothing of the user's."""
    from gpt2onnx.runtime.folder import open_manifest

    try:
        open_manifest(folder, verify=True)
    except ModelFolderError as exc:
        return str(exc)
    return None


def check_replaceable(out: Path, shown: Path | None = None) -> None:
    """Refuse an OUT_DIR that exists and is neither empty nor our own earlier export."""
    shown = shown or out
    if not out.exists():
        return
    if not out.is_dir():
        raise ModelFolderError(
            f"OUT_DIR {str(shown)!r} exists and is not a folder; refusing to overwrite it. "
            "Choose another OUT_DIR or remove it.")
    if not any(out.iterdir()) or is_our_export(out):
        return
    edited = edited_files(out) if (out / REPORT_FILE).is_file() else None
    if edited is not None:
        raise ModelFolderError(
            f"OUT_DIR {str(shown)!r} is an earlier export whose files were changed since "
            f"({edited}); refusing to overwrite what may be your edits. Choose another "
            "OUT_DIR, or remove it if nothing in it is yours.")
    raise ModelFolderError(
        f"OUT_DIR {str(shown)!r} exists and is not a gpt2onnx model folder (an export has a "
        f"{MANIFEST_FILE} gpt2onnx can read, an {REPORT_FILE} and only the files its "
        "manifest lists); refusing to overwrite it. Choose another OUT_DIR or remove it.")


def _check_writable(out: Path, shown: Path) -> None:
    """Fail now, not after minutes of loading, when the parent cannot be written."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ModelFolderError(
            f"cannot write OUT_DIR {str(shown)!r}: no write permission in {parent}. Choose "
            "an OUT_DIR in a folder you can write to.")


def _owner_is_gone(marker: Path) -> bool:
    """Whether the export that wrote ``marker`` is no longer running on this host."""
    try:
        pid_text, host = marker.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return True  # unreadable: an export killed while writing its first file
    if host != socket.gethostname():
        return False  # another machine's export on a shared disk: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_leftovers(out: Path) -> list[Path]:
    """Remove staging and old folders an interrupted export of ``out`` left beside it.

    Only folders that are provably ours go: staging folders carrying our marker whose
    process is gone, and old folders that are complete exports. Returns what was removed.
    """
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        if entry.is_symlink() or not entry.is_dir():
            continue
        kind = entry.name[len(out.name) + 2:].split("-", 1)[0]
        marker = entry / STAGING_MARKER
        ours = ((kind == "partial" and marker.is_file() and _owner_is_gone(marker))
                or (kind == "old" and is_our_export(entry)))
        if ours:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A staging folder beside ``out`` (removed on error or interrupt), marked as ours
    and with the permissions a folder made by mkdir would have (mkdtemp makes 0700)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / STAGING_MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
        tmp.chmod(0o777 & ~current_umask())
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place; an older export there is replaced."""
    check_replaceable(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        # Interrupted (or failed) between the two renames: put the older export back.
        if old is not None and not out.exists():
            old.rename(out)
        raise
    (out / STAGING_MARKER).unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
