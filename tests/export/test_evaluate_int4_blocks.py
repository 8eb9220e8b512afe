"""tools/evaluate_precisions.py --int4-block-size: int4 scored at each block, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EMBEDDED_MODEL

TOOL = Path(__file__).resolve().parents[2] / "tools" / "evaluate_precisions.py"
pytestmark = pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").exists(),
                                reason="models/pydoc-tiny is not in this checkout")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--model", str(EMBEDDED_MODEL), *args],
                          capture_output=True, text=True, timeout=600)


def test_scores_int4_at_each_block_and_writes_nothing():
    card = (EMBEDDED_MODEL / "README.md").read_text()
    before = (EMBEDDED_MODEL / "eval.json").read_text()
    proc = _run("--blocks", "2", "--int4-block-size", "16", "128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|") for line in proc.stdout.splitlines()
            if line.startswith("| 16 ") or line.startswith("| 128 ")]
    assert [r[1].strip() for r in rows] == ["16", "128"]
    for r in rows:
        assert 1 < float(r[2]) < 1e4 and 0 < float(r[3].rstrip(" %")) <= 100
    assert (EMBEDDED_MODEL / "eval.json").read_text() == before
    assert (EMBEDDED_MODEL / "README.md").read_text() == card


def test_a_bad_block_size_is_one_line_and_exit_2():
    proc = _run("--int4-block-size", "48")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "one of (16, 32, 64, 128, 256), got 48" in proc.stderr
