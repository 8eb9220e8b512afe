"""tools/engine_closed_loop.py (docs/serving.md's in-process numbers): it drives the real
engine on a tiny folder and reports every request's tokens, and refuses bad arguments
with one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "engine_closed_loop.py"


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *argv], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("flags", [[], ["--no-mixed-runs", "--spin", "0", "--sampled"],
                                   ["--prefill-chunk", "4"]])
def test_the_loop_runs_the_engine(tiny_fused: Path, flags: list[str]) -> None:
    proc = run_tool(str(tiny_fused), "--clients", "3", "--requests", "6", "--tokens", "5",
                    *flags)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["output_tok_s"] > 0 and r["ttft_ms_median"] > 0
    # 6 requests of 5 tokens on 3 slots: at least 2 rounds of 5 steps
    assert r["model_runs"] >= 10, r
    assert r["mixed"] is ("--no-mixed-runs" not in flags)
    assert r["sampled"] is ("--sampled" in flags)
    assert 0 < r["run_s_total"] <= r["wall_s"], r


@pytest.mark.parametrize(("argv", "words"), [
    (["--clients", "0"], "--clients must be at least 1"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be at least 1"),
    (["--spin", "sometimes"], "invalid choice"),
])
def test_bad_arguments_are_one_line(tiny_fused: Path, argv: list[str], words: str) -> None:
    proc = run_tool(str(tiny_fused), *argv)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_a_folder_without_a_manifest_is_refused(tmp_path: Path) -> None:
    proc = run_tool(str(tmp_path))
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr, proc.stderr
