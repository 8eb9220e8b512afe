"""The serving stack runs on the light runtime + the [serve] extra: no torch."""

from __future__ import annotations

import subprocess
import sys


def test_serve_and_loadtest_import_neither_torch_nor_transformers() -> None:
    code = ("import sys, gpt2onnx.serve, gpt2onnx.serve.__main__, gpt2onnx.loadtest; "
            "heavy = sorted({'torch', 'transformers', 'onnx'} & set(sys.modules)); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
