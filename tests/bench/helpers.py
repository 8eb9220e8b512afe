"""Running a bench module's --smoke preset as CI does, and one bench worker, in
subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_smoke(module: str, tmp_path: Path, result: str) -> dict[str, Any]:
    """``python -m MODULE --smoke`` into ``tmp_path``; returns results/RESULT parsed."""
    cmd = [sys.executable, "-m", module, "--smoke", "--out", str(tmp_path / "results"),
           "--cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "results" / result).read_text())


def worker_replies(python: Path | str, kind: str, folder: Path, commands: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
    """One bench worker (``python -m gpt2onnx.bench.worker``) for ``kind`` on ``folder``:
    its ready line, then a reply per command (a final ``quit`` is added). The exit status
    is checked too: an engine left to the interpreter's teardown may abort the process."""
    from gpt2onnx.bench.measurements import worker_env

    spec = json.dumps({"kind": kind, "folder": str(folder)})
    lines = "".join(json.dumps(c) + "\n" for c in (*commands, {"op": "quit"}))
    done = subprocess.run([str(python), "-m", "gpt2onnx.bench.worker", spec], input=lines,
                          capture_output=True, text=True, timeout=300, env=worker_env())
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def decode(prompt: list[int], new: int, batch: int = 1, sampled: bool = False
           ) -> dict[str, Any]:
    """A worker ``decode`` command."""
    cmd: dict[str, Any] = {"op": "decode", "prompt": prompt, "new_tokens": new, "batch": batch}
    return {**cmd, "sampled": True} if sampled else cmd
