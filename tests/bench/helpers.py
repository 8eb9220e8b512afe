"""Running a bench module's --smoke preset as CI does, in a subprocess."""

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
