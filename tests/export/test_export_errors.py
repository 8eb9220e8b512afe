"""Bad sources, bad options and failed validations: typed errors, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpt2onnx.errors import (
    InvalidParameterError,
    ModelFolderError,
    UnsupportedConfigError,
    ValidationError,
)
from gpt2onnx.export import validate
from gpt2onnx.export.api import ExportOptions, export_model


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_failed_validation_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    impossible = validate.Thresholds(logits_rel=-1.0, cache_rel=1.0, top1=0.0, greedy=0.0,
                                     greedy_exact=False)
    monkeypatch.setitem(validate.THRESHOLDS, "fp32", impossible)
    out = tmp_path / "model"
    with pytest.raises(ValidationError) as err:
        export_model(tiny_checkpoint, out, ExportOptions(layout="standard"))
    assert "logits max|diff|/range" in str(err.value) and "✗" in str(err.value)
    assert _leftovers(tmp_path) == []


def test_failed_validation_keeps_the_previous_export(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "model"
    export_model(tiny_checkpoint, out, ExportOptions(layout="standard", validate=False))
    before = (out / "manifest.json").read_text()
    monkeypatch.setitem(validate.THRESHOLDS, "fp32",
                        validate.Thresholds(-1.0, 1.0, 0.0, 0.0, False))
    with pytest.raises(ValidationError):
        export_model(tiny_checkpoint, out, ExportOptions(layout="standard"))
    assert (out / "manifest.json").read_text() == before
    assert _leftovers(tmp_path) == ["model"]


def test_refuses_to_overwrite_a_foreign_folder(tiny_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ModelFolderError, match="refusing to overwrite"):
        export_model(tiny_checkpoint, out, ExportOptions(validate=False))
    assert (out / "notes.txt").read_text() == "precious"


def test_missing_source(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        export_model(tmp_path / "nope", tmp_path / "out", ExportOptions())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("config", "match"), [
    ({"activation_function": "gelu_10"}, "activation_function='gelu_10'"),
    ({"add_cross_attention": True}, "add_cross_attention"),
])
def test_unsupported_config_is_refused(config, match, make_checkpoint, tmp_path):
    with pytest.raises(UnsupportedConfigError, match=match):
        export_model(make_checkpoint(**config), tmp_path / "out", ExportOptions())


def test_fused_needs_head_dim_multiple_of_8(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(n_head=16)  # head_dim 4
    with pytest.raises(UnsupportedConfigError, match="multiple of 8"):
        export_model(ckpt, tmp_path / "out", ExportOptions(layout="fused"))
    export_model(ckpt, tmp_path / "std", ExportOptions(layout="standard"))


@pytest.mark.parametrize(("options", "param", "match"), [
    ({"layout": "sideways"}, "layout", "layout must be one of"),
    ({"precision": "int2"}, "precision", "precision must be one of"),
    ({"layout": "standard", "precision": "int8"}, "precision", "--layout fused"),
    ({"layout": "fused", "precision": "fp32", "provider": "cuda"}, "precision", "fp16"),
    ({"layout": "fused", "precision": "int8", "provider": "cuda"}, "precision", "int4"),
    ({"max_length": 4096}, "max_length", r"\[2, 128\]"),
    ({"precision": "int8", "int4_block_size": 64}, "int4_block_size", "int4 only"),
    ({"precision": "int4", "int4_block_size": 48}, "int4_block_size",
     r"one of \(16, 32, 64, 128, 256\), got 48"),
    ({"precision": "int4", "int4_block_size": True}, "int4_block_size", "got True"),
    ({"precision": "int4", "int4_block_size": 64.0}, "int4_block_size", "got 64.0"),
])
def test_bad_options(options, param, match, tiny_checkpoint, tmp_path):
    with pytest.raises(InvalidParameterError, match=match) as err:
        export_model(tiny_checkpoint, tmp_path / "out", ExportOptions(**options))
    assert err.value.param == param
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpt2onnx.export", str(tmp_path / "missing"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("error: SOURCE ")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flags", "match"), [
    (["--precision", "int4", "--int4-block-size", "48"], "invalid choice: 48"),
    (["--precision", "int8", "--int4-block-size", "64"], "--precision int4 only"),
])
def test_cli_refuses_a_bad_int4_block_size(flags, match, tiny_checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpt2onnx.export", str(tiny_checkpoint),
                           str(tmp_path / "out"), *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and match in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_cli_exports(tiny_checkpoint, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "gpt2onnx.export", str(tiny_checkpoint),
                           str(out), "--layout", "fused", "--max-length", "64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "✓ logits" in proc.stderr
    assert (out / "manifest.json").exists() and (out / "export_report.json").exists()
