"""Ray stays optional: nothing but ``gpt2onnx.serve.ray.deployment`` imports it, and
without it the Ray CLI says how to install it. Runs whether or not Ray is installed."""

from __future__ import annotations

import subprocess
import sys


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_the_package_and_the_ray_cli_module_import_without_ray() -> None:
    result = run_python(
        "import sys, gpt2onnx.serve, gpt2onnx.serve.__main__, gpt2onnx.serve.ray, "
        "gpt2onnx.serve.ray.__main__; sys.exit('ray' in sys.modules)")
    assert result.returncode == 0, "importing gpt2onnx.serve imported ray\n" + result.stderr


def test_the_ray_cli_without_ray_says_how_to_install_it() -> None:
    # None in sys.modules makes `import ray` fail as if it were not installed.
    result = run_python(
        "import runpy, sys; sys.modules['ray'] = None; "
        "sys.argv = ['gpt2onnx.serve.ray', 'some/model']; "
        "runpy.run_module('gpt2onnx.serve.ray', run_name='__main__')")
    assert result.returncode == 2, result.stderr
    assert "pip install 'gpt2onnx[ray]'" in result.stderr
    assert "Traceback" not in result.stderr
