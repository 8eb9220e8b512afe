"""The peer environment: optimum-onnx with transformers 4.57 in its own venv (.venv-optimum,
made by `make optimum-venv`; optimum-onnx needs transformers < 4.58)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-optimum" / "bin" / "python"
PEER_CLI = ROOT / ".venv-optimum" / "bin" / "optimum-cli"

requires_peer = pytest.mark.skipif(
    not PEER_CLI.exists(),
    reason="needs the optimum peer venv: run `make optimum-venv` (make test does)")


def run_peer(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the peer venv's python with this checkout importable (no install into it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(PEER_PYTHON), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# onnxruntime-genai in its own venv (.venv-genai, `make test` makes it): it ships its own
# onnxruntime build, which must not replace ours.
GENAI_PYTHON = ROOT / ".venv-genai" / "bin" / "python"

requires_genai = pytest.mark.skipif(
    not GENAI_PYTHON.exists(),
    reason="needs the onnxruntime-genai venv: run `make .venv-genai/.installed` (make test does)")


def run_genai(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the genai venv's python (without this checkout on its path: genai alone)."""
    return subprocess.run([str(GENAI_PYTHON), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
