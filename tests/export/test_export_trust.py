"""An exporter you can trust (issue 16): nothing of the user's is deleted, OUT_DIR is
checked before the slow load, interrupted exports are cleaned up, folders get normal
permissions, a broken checkpoint or a tokenizer that does not fit is a one-line typed
error, and the CLI exits 2 (130 / 143 on SIGINT / SIGTERM) without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2onnx.contract import GRAPH_FILE, MANIFEST_FILE, REPORT_FILE
from gpt2onnx.errors import ModelFolderError, UnsupportedConfigError, ValidationError
from gpt2onnx.export import api, destination
from gpt2onnx.export.__main__ import main as export_main
from gpt2onnx.export.api import ExportOptions, export_model
from tests.conftest import EMBEDDED_MODEL, TOKENIZER_DIR, default_sigint

FAST = ExportOptions(layout="standard", validate=False)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_ckpt(make_checkpoint) -> Path:
    """A one-layer checkpoint with a small trained tokenizer: quick to load and build."""
    return make_checkpoint(seed=5, n_layer=1, n_embd=32, n_head=2, n_positions=32,
                           vocab_size=1000)


@pytest.fixture()
def earlier_export(small_ckpt, tmp_path) -> Path:
    out = tmp_path / "model"
    export_model(small_ckpt, out, FAST)
    return out


def _no_load(monkeypatch) -> None:
    """Make loading the checkpoint an error: the check under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before OUT_DIR was checked")
    monkeypatch.setattr(api, "load_model", refuse)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# -- 1. OUT_DIR: replaced only when provably our earlier export -------------------------

def test_web_app_folder_with_a_manifest_is_refused_untouched(small_ckpt, tmp_path,
                                                            monkeypatch):
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / MANIFEST_FILE).write_text(json.dumps({"name": "my app", "start_url": "/"}))
    (app / "index.html").write_text("<html></html>")
    (app / "src" / "main.js").write_text("console.log(1)")
    before = _tree(app)
    _no_load(monkeypatch)
    with pytest.raises(ModelFolderError, match="refusing to overwrite") as err:
        export_model(small_ckpt, app, FAST)
    assert str(app) in str(err.value) and "Choose another OUT_DIR" in str(err.value)
    assert _tree(app) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app"]


def test_our_export_with_a_user_file_added_is_refused(earlier_export, small_ckpt):
    (earlier_export / "notes.txt").write_text("mine")
    with pytest.raises(ModelFolderError, match="not a gpt2onnx model folder"):
        export_model(small_ckpt, earlier_export, FAST)
    assert (earlier_export / "notes.txt").read_text() == "mine"


def test_a_parseable_manifest_without_the_export_report_is_refused(earlier_export,
                                                                   small_ckpt):
    (earlier_export / REPORT_FILE).unlink()
    with pytest.raises(ModelFolderError, match="refusing to overwrite"):
        export_model(small_ckpt, earlier_export, FAST)
    assert (earlier_export / GRAPH_FILE).exists()


def test_a_manifest_of_an_unknown_format_is_refused(earlier_export, small_ckpt):
    data = json.loads((earlier_export / MANIFEST_FILE).read_text())
    data["format_version"] = 99
    (earlier_export / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match="refusing to overwrite"):
        export_model(small_ckpt, earlier_export, FAST)


def test_an_earlier_export_and_an_empty_folder_are_replaced(earlier_export, small_ckpt,
                                                           tmp_path):
    export_model(small_ckpt, earlier_export, ExportOptions(layout="fused", validate=False))
    assert json.loads((earlier_export / MANIFEST_FILE).read_text())["layout"] == "fused"
    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(small_ckpt, empty, FAST)
    assert (empty / MANIFEST_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model"]


def test_a_file_as_out_dir_is_refused(small_ckpt, tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.write_text("data")
    _no_load(monkeypatch)
    with pytest.raises(ModelFolderError, match="not a folder"):
        export_model(small_ckpt, target, FAST)
    assert target.read_text() == "data"


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_the_current_folder_and_its_ancestors_are_refused(out, small_ckpt, tmp_path,
                                                         monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _no_load(monkeypatch)
    with pytest.raises(ModelFolderError, match="current folder or one of its ancestors"):
        export_model(small_ckpt, out, FAST)
    assert list(work.iterdir()) == []


def test_out_dir_overlapping_source_is_refused(small_ckpt, tmp_path, monkeypatch):
    _no_load(monkeypatch)
    for out in (small_ckpt, small_ckpt / "onnx"):
        with pytest.raises(ModelFolderError, match="overlaps SOURCE"):
            export_model(small_ckpt, out, FAST)
    copy = shutil.copytree(small_ckpt, tmp_path / "parent" / "ckpt")
    with pytest.raises(ModelFolderError, match="overlaps SOURCE"):
        export_model(copy, tmp_path / "parent", FAST)
    assert not (small_ckpt / "onnx").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_no_write_permission_fails_before_loading(small_ckpt, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    _no_load(monkeypatch)
    try:
        with pytest.raises(ModelFolderError, match="no write permission") as err:
            export_model(small_ckpt, locked / "deeper" / "model", FAST)
        assert str(locked) in str(err.value)
    finally:
        locked.chmod(0o755)


def test_no_write_permission_is_checked_before_loading(small_ckpt, tmp_path, monkeypatch):
    """The same check where the tests run as root (who may write anywhere)."""
    monkeypatch.setattr(destination.os, "access", lambda path, mode: False)
    _no_load(monkeypatch)
    with pytest.raises(ModelFolderError, match=f"no write permission in {tmp_path}"):
        export_model(small_ckpt, tmp_path / "model", FAST)


# -- 2. leftovers of interrupted exports --------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _staging(parent: Path, name: str, marker: str | None) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / GRAPH_FILE).write_bytes(b"half a graph")
    if marker is not None:
        (folder / destination.STAGING_MARKER).write_text(marker)
    return folder


def test_next_export_removes_only_provably_ours_leftovers(earlier_export, small_ckpt):
    import socket

    parent, host = earlier_export.parent, socket.gethostname()
    killed = _staging(parent, ".model.partial-killed", f"{_dead_pid()} {host}\n")
    torn = _staging(parent, ".model.partial-torn", "")  # killed while writing the marker
    running = _staging(parent, ".model.partial-live", f"{os.getpid()} {host}\n")
    unmarked = _staging(parent, ".model.partial-user", None)
    other_host = _staging(parent, ".model.partial-nfs", f"{_dead_pid()} elsewhere\n")
    other_name = _staging(parent, ".other.partial-x", f"{_dead_pid()} {host}\n")
    old_export = parent / ".model.old-abc"
    shutil.copytree(earlier_export, old_export)
    old_foreign = parent / ".model.old-def"
    old_foreign.mkdir()
    (old_foreign / "thesis.tex").write_text("precious")

    export_model(small_ckpt, earlier_export, FAST)

    for gone in (killed, torn, old_export):
        assert not gone.exists(), gone
    for kept in (running, unmarked, other_host, other_name, old_foreign):
        assert kept.exists(), kept
    assert (old_foreign / "thesis.tex").read_text() == "precious"
    assert not (earlier_export / destination.STAGING_MARKER).exists()


# Runs the export CLI with one stage made to wait (after touching READY) so a signal lands
# inside that stage, not before or after it.
_STALLED_CLI = """
import sys, time
from pathlib import Path
from gpt2onnx.export import api, validate
from gpt2onnx.export.__main__ import main
stage, ready = sys.argv[1], Path(sys.argv[2])
def stalled(real):
    def wait_then_run(*args, **kwargs):
        ready.touch()
        time.sleep(60)
        return real(*args, **kwargs)
    return wait_then_run
if stage == "load":
    api.load_model = stalled(api.load_model)
else:
    validate.validate_folder = stalled(validate.validate_folder)
sys.exit(main(sys.argv[3:]))
"""


def _stalled_cli(stage: str, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"ready-{stage}"
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_CLI, stage, str(ready), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the export never reached the stage"
        time.sleep(0.05)
    return proc, ready


@pytest.mark.parametrize("stage", ["load", "validate"])
@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_signal_cleans_up_and_keeps_the_older_export(sig, code, word, stage, small_ckpt,
                                                     tmp_path):
    out = tmp_path / "exports" / "model"
    export_model(small_ckpt, out, FAST)
    before = _tree(out)
    proc, _ = _stalled_cli(stage, tmp_path, str(small_ckpt), str(out), "--layout",
                           "standard")
    if stage == "validate":
        assert [p.name for p in out.parent.glob(".model.partial-*")]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == word, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]
    assert _tree(out) == before


def test_a_killed_export_is_cleaned_up_by_the_next(earlier_export, small_ckpt, tmp_path):
    proc, _ = _stalled_cli("validate", tmp_path, str(small_ckpt), str(earlier_export),
                           "--layout", "standard")
    proc.kill()
    proc.communicate(timeout=60)
    left = [p.name for p in earlier_export.parent.glob(".model.partial-*")]
    assert left, "SIGKILL: nothing could clean up"
    export_model(small_ckpt, earlier_export, FAST)
    assert not list(earlier_export.parent.glob(".model.*"))


def test_interrupt_between_the_renames_puts_the_older_export_back(earlier_export,
                                                                  small_ckpt, monkeypatch):
    before = _tree(earlier_export)
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".model.partial-"):  # the new folder's move into place
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        export_model(small_ckpt, earlier_export, FAST)
    monkeypatch.undo()
    assert _tree(earlier_export) == before
    assert sorted(p.name for p in earlier_export.parent.iterdir()) == ["model"]


# -- 3. permissions ----------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_published_folder_has_umask_permissions(umask, small_ckpt, tmp_path):
    previous = os.umask(umask)
    try:
        out = tmp_path / "model"
        export_model(small_ckpt, out, FAST)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


# -- 4. a symlinked OUT_DIR is written through -------------------------------------------

def test_symlinked_out_dir_is_written_through(earlier_export, small_ckpt, tmp_path):
    link = tmp_path / "links" / "current"
    link.parent.mkdir()
    link.symlink_to(earlier_export)
    export_model(small_ckpt, link, ExportOptions(layout="fused", validate=False))
    assert link.is_symlink() and link.resolve() == earlier_export.resolve()
    assert json.loads((earlier_export / MANIFEST_FILE).read_text())["layout"] == "fused"
    assert sorted(p.name for p in link.parent.iterdir()) == ["current"]
    assert sorted(p.name for p in earlier_export.parent.iterdir()) == ["links", "model"]


def test_symlink_to_a_foreign_folder_is_refused(small_ckpt, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "photo.jpg").write_bytes(b"jpeg")
    link = tmp_path / "model"
    link.symlink_to(data)
    _no_load(monkeypatch)
    with pytest.raises(ModelFolderError, match="refusing to overwrite"):
        export_model(small_ckpt, link, FAST)
    assert link.is_symlink() and (data / "photo.jpg").read_bytes() == b"jpeg"


# -- 5. broken checkpoints are one-line typed errors --------------------------------------

def _broken(ckpt: Path, tmp_path: Path, config: dict | None = None,
            weights: tuple[str, bytes | None] | None = None) -> Path:
    copy = shutil.copytree(ckpt, tmp_path / "broken")
    if config:
        data = json.loads((copy / "config.json").read_text())
        data.update(config)
        (copy / "config.json").write_text(json.dumps(data))
    if weights:
        (copy / "model.safetensors").unlink()
        name, content = weights
        if content is not None:
            (copy / name).write_bytes(content)
    return copy


def _truncated(ckpt: Path) -> bytes:
    return (ckpt / "model.safetensors").read_bytes()[:2000]


@pytest.mark.parametrize(("case", "error", "match"), [
    ("truncated safetensors", ModelFolderError, "cannot load GPT-2 weights"),
    ("garbage safetensors", ModelFolderError, "cannot load GPT-2 weights"),
    ("garbage pytorch_model.bin", ModelFolderError, "cannot load GPT-2 weights"),
    ("no weights", ModelFolderError, "cannot load GPT-2 weights"),
    ("n_head 0", UnsupportedConfigError, r"n_head=0 must be an integer >= 1"),
    ("n_layer -1", UnsupportedConfigError, r"n_layer=-1 must be an integer >= 1"),
    ("string n_head", ModelFolderError, "cannot load a config"),
    ("null vocab_size", ModelFolderError, "cannot load a config.*'vocab_size'"),
    ("string layer_norm_epsilon", ModelFolderError, "cannot load a config"),
    ("zero layer_norm_epsilon", UnsupportedConfigError, "layer_norm_epsilon=0.0 must be a number"),
    ("n_embd not divisible", UnsupportedConfigError, "not divisible by n_head"),
    ("wider than the weights", ModelFolderError,
     r"wrong shape .*\(32, 96\) in the file, \(64, 192\) from config.json"),
    ("deeper than the weights", ModelFolderError, r"lack 12 tensor\(s\)"),
    ("pad_token_id past vocab", UnsupportedConfigError, r"pad_token_id=1000 .*\[0, 999\]"),
    ("bos_token_id negative", UnsupportedConfigError, r"bos_token_id=-1 .*\[0, 999\]"),
    ("eos_token_id list past vocab", UnsupportedConfigError, r"eos_token_id=\[0, 5000\]"),
    ("no config.json", ModelFolderError, "cannot load a config"),
])
def test_broken_checkpoint_is_a_one_line_typed_error(case, error, match, small_ckpt,
                                                     tmp_path):
    edits = {
        "truncated safetensors": {"weights": ("model.safetensors", _truncated(small_ckpt))},
        "garbage safetensors": {"weights": ("model.safetensors", os.urandom(4096))},
        "garbage pytorch_model.bin": {"weights": ("pytorch_model.bin", b"not a pickle" * 99)},
        "no weights": {"weights": ("model.safetensors", None)},
        "n_head 0": {"config": {"n_head": 0}},
        "n_layer -1": {"config": {"n_layer": -1}},
        "string n_head": {"config": {"n_head": "2"}},
        "null vocab_size": {"config": {"vocab_size": None}},
        "string layer_norm_epsilon": {"config": {"layer_norm_epsilon": "small"}},
        "zero layer_norm_epsilon": {"config": {"layer_norm_epsilon": 0.0}},
        "n_embd not divisible": {"config": {"n_embd": 33}},
        "wider than the weights": {"config": {"n_embd": 64}},
        "deeper than the weights": {"config": {"n_layer": 2}},
        "pad_token_id past vocab": {"config": {"pad_token_id": 1000}},
        "bos_token_id negative": {"config": {"bos_token_id": -1}},
        "eos_token_id list past vocab": {"config": {"eos_token_id": [0, 5000]}},
    }
    if case == "no config.json":
        source = shutil.copytree(small_ckpt, tmp_path / "broken")
        (source / "config.json").unlink()
    else:
        source = _broken(small_ckpt, tmp_path, **edits[case])
    with pytest.raises(error, match=match) as err:
        export_model(source, tmp_path / "out", FAST)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]



def test_weights_with_more_layers_than_config_are_refused(make_checkpoint, tmp_path):
    # transformers drops the extra layers' tensors as "unexpected" and loads a shallower
    # model: exported, that would be another model than the checkpoint.
    two = make_checkpoint(seed=5, n_layer=2, n_embd=32, n_head=2, n_positions=32,
                          vocab_size=1000)
    source = _broken(two, tmp_path, config={"n_layer": 1})
    with pytest.raises(ModelFolderError, match=r"hold \d+ tensor\(s\) config.json has no "
                       r"place for \(transformer.h.1."):
        export_model(source, tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()


def test_garbage_pickle_message_does_not_advise_unsafe_loading(small_ckpt, tmp_path):
    source = _broken(small_ckpt, tmp_path, weights=("pytorch_model.bin", b"not a pickle" * 99))
    with pytest.raises(ModelFolderError) as err:
        export_model(source, tmp_path / "out", FAST)
    assert "weights_only=False" not in str(err.value)


@pytest.mark.parametrize(("flag", "value", "match"), [
    ("source", "config.json", "is a file"),
    ("source", "/nonexistent/ckpt", "does not exist"),
    ("tokenizer", "/nonexistent/tok", "does not exist"),
    ("tokenizer", "./no-such-tokenizer", "does not exist"),
])
def test_local_paths_that_are_not_folders_fail_at_once(flag, value, match, small_ckpt,
                                                       tmp_path):
    # Spelled as a path: refused at once, not after 30 s of hub retries for a typo.
    source = small_ckpt / value if value == "config.json" else value
    if flag == "tokenizer":
        source, opts = small_ckpt, ExportOptions(layout="standard", validate=False,
                                                 tokenizer=value)
    else:
        opts = FAST
    t0 = time.perf_counter()
    with pytest.raises(ModelFolderError, match=match):
        export_model(source, tmp_path / "out", opts)
    assert time.perf_counter() - t0 < 10


def test_cli_error_after_loading_is_one_line(small_ckpt, tmp_path):
    # transformers' load report table and progress bars must not bury the one error line.
    source = _broken(small_ckpt, tmp_path, config={"n_embd": 64})
    done = subprocess.run([sys.executable, "-m", "gpt2onnx.export", str(source),
                           str(tmp_path / "out"), "--layout", "standard"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr


# -- 6. the tokenizer must belong to the model --------------------------------------------

def test_checkpoint_without_tokenizer_files_asks_for_tokenizer(small_ckpt, tmp_path):
    source = shutil.copytree(small_ckpt, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (source / name).unlink(missing_ok=True)
    with pytest.raises(ModelFolderError, match=r"no tokenizer files.*pass --tokenizer"):
        export_model(source, tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(),
                    reason="models/pydoc-tiny is not in this checkout")
def test_gpt2_tokenizer_on_the_8192_token_model_fails_naming_both_sizes(tmp_path):
    opts = ExportOptions(layout="fused", tokenizer=str(TOKENIZER_DIR))
    with pytest.raises(ModelFolderError) as err:
        export_model(EMBEDDED_MODEL, tmp_path / "out", opts)
    message = str(err.value)
    assert "50257 tokens" in message and "vocab_size is 8192" in message
    assert "--tokenizer" in message and str(TOKENIZER_DIR) in message
    assert "omit --tokenizer to use SOURCE's own" in message
    assert not (tmp_path / "out").exists()


def test_an_empty_tokenizer_is_refused():
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from gpt2onnx.export.tokenizer_check import check_tokenizer

    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    spec = SimpleNamespace(vocab_size=1000, bos_token_id=None, eos_token_id=None,
                           pad_token_id=None)
    with pytest.raises(ModelFolderError, match=r"is empty .*pass --tokenizer"):
        check_tokenizer(empty, spec, "SOURCE 'x'")


def test_special_ids_missing_from_the_tokenizer_are_refused(make_checkpoint, tmp_path):
    # The small trained tokenizer has a few hundred tokens; id 999 is not one of them.
    ckpt = make_checkpoint(seed=5, n_layer=1, n_embd=32, n_head=2, n_positions=32,
                           vocab_size=1000, bos_token_id=999)
    with pytest.raises(ModelFolderError, match=r"bos_token_id=999 is not a token"):
        export_model(ckpt, tmp_path / "out", FAST)


def test_a_tokenizer_that_does_not_round_trip_fails_validation(small_ckpt, tmp_path):
    source = shutil.copytree(small_ckpt, tmp_path / "lower")
    data = json.loads((source / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}  # "Return" comes back as "return"
    (source / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValidationError, match="pass --tokenizer") as err:
        export_model(source, tmp_path / "out", ExportOptions(layout="standard"))
    assert "✗ tokenizer round trip (texts)" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lower"]


def test_validation_reports_the_round_trip_of_the_folders_tokenizer(earlier_export,
                                                                   small_ckpt, tmp_path):
    report = export_model(small_ckpt, tmp_path / "checked", ExportOptions(layout="fused"))
    checks = {c["name"]: c for c in report["validation"]["checks"]}
    assert checks["tokenizer round trip (texts)"]["passed"]
    assert checks["tokenizer round trip (texts)"]["value"] == 4
    # The greedy comparison ran on real text ids, not random ones.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "checked" / "tokenizer.json"))
    prompt = tok.encode("Return a new list", add_special_tokens=False).ids
    assert report["validation"]["metrics"]["greedy_ours"]
    assert len(prompt) >= 2


def test_external_data_outside_the_folder_is_refused(small_ckpt, tmp_path, monkeypatch):
    """Held up in the probe, kept: a graph whose weights point outside its folder
    does not load, even with its hash updated to match."""
    import onnx

    from gpt2onnx.contract import sha256_file
    from gpt2onnx.export import folder as model_folder
    from gpt2onnx.runtime import Model

    monkeypatch.setattr(model_folder, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "model"
    export_model(small_ckpt, out, FAST)
    shutil.move(out / "model.onnx.data", tmp_path / "outside.data")
    graph = onnx.load(str(out / GRAPH_FILE), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save_model(graph, str(out / GRAPH_FILE))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"][GRAPH_FILE] = sha256_file(out / GRAPH_FILE)
    manifest["files"].pop("model.onnx.data")
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="escapes model directory"):
        Model(out)


# -- 9. the graph carries the manifest's shape facts --------------------------------------

def test_graph_metadata_matches_the_manifest(earlier_export):
    import onnx

    from gpt2onnx.contract import Manifest, graph_props

    graph = onnx.load(str(earlier_export / GRAPH_FILE), load_external_data=False)
    props = {p.key: p.value for p in graph.metadata_props}
    expected = graph_props(Manifest.load(earlier_export))
    assert {k: props.get(k) for k in expected} == expected
    assert expected["gpt2onnx.context_length"] == "32"


# -- 7. the CLI: one line, exit 2 ---------------------------------------------------------

def _one_error_line(capsys) -> str:
    """The error is one line (transformers' own loading bar may come before it)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err
    assert err.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


def test_cli_user_errors_exit_2_with_one_line(small_ckpt, tmp_path, capsys):
    assert export_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert _one_error_line(capsys).startswith("error: SOURCE ")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    assert export_main([str(small_ckpt), str(foreign)]) == 2
    assert "refusing to overwrite" in _one_error_line(capsys)
    bare = shutil.copytree(small_ckpt, tmp_path / "bare")
    (bare / "model.safetensors").write_bytes(b"junk")
    assert export_main([str(bare), str(tmp_path / "out")]) == 2
    assert "cannot load GPT-2 weights" in _one_error_line(capsys)


@pytest.mark.parametrize("value", ["0", "1", "-1", "abc", "99999999999"])
def test_cli_max_length_has_a_range(value, small_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_main([str(small_ckpt), str(tmp_path / "out"), "--max-length", value])
    assert exit_.value.code == 2
    assert "--max-length" in _one_error_line(capsys)


@pytest.mark.parametrize("value", ["8", 8.0, True])
def test_api_max_length_must_be_an_integer(value, small_ckpt, tmp_path):
    from gpt2onnx.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="max_length must be in"):
        export_model(small_ckpt, tmp_path / "out", ExportOptions(max_length=value))


def test_cli_max_length_past_the_position_table_is_one_line(small_ckpt, tmp_path, capsys):
    assert export_main([str(small_ckpt), str(tmp_path / "out"), "--max-length", "64"]) == 2
    assert r"[2, 32]" in _one_error_line(capsys)


def test_cli_refuses_out_dir_that_is_not_utf8(small_ckpt, tmp_path):
    proc = subprocess.run([sys.executable.encode(), b"-m", b"gpt2onnx.export",
                           os.fsencode(small_ckpt), os.fsencode(tmp_path) + b"/\xff"],
                          capture_output=True, timeout=120, cwd=REPO)
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "UTF-8" in err[0], err


def test_an_earlier_export_with_an_edited_file_is_refused_untouched(earlier_export,
                                                                    small_ckpt):
    # Only the names of its files were checked before: a hand-edited tokenizer.json (the
    # user's work) was replaced silently.
    tokenizer = earlier_export / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")
    before = _tree(earlier_export)
    with pytest.raises(ModelFolderError, match=r"files were changed since .*tokenizer\.json"):
        export_model(small_ckpt, earlier_export, FAST)
    assert _tree(earlier_export) == before
