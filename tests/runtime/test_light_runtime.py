"""The runtime runs on onnxruntime, numpy and tokenizers alone; the CLI drives the API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from gpt2onnx.runtime import Model

NO_TORCH = """
import sys, json
import gpt2onnx.runtime as rt
model = rt.Model(sys.argv[1])
result = model.generate("Hello", max_new_tokens=4)
pieces = list(model.stream("Hello", max_new_tokens=4))
heavy = sorted(m for m in ("torch", "transformers", "optimum", "onnx") if m in sys.modules)
print(json.dumps({"heavy": heavy, "tokens": result.token_ids}))
"""


def test_runtime_never_imports_torch_or_transformers(tiny_standard, tiny_fused):
    for folder in (tiny_standard, tiny_fused):
        proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(folder)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["heavy"] == [], f"runtime imported {out['heavy']}"
        assert len(out["tokens"]) == 4


def test_cli_json(tiny_fused):
    proc = subprocess.run([sys.executable, "-m", "gpt2onnx.runtime.generate", str(tiny_fused),
                           "--prompt", "Hello world", "--max-new-tokens", "6", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "timings"}
    assert set(out["timings"]) == {"prefill_ms", "decode_ms_per_token"}
    model = Model(tiny_fused)
    assert out["prompt_token_ids"] == model.encode("Hello world")
    assert out["token_ids"] == model.generate("Hello world", max_new_tokens=6).token_ids


def test_cli_stream_prints_prompt_and_text(tiny_fused):
    proc = subprocess.run([sys.executable, "-m", "gpt2onnx.runtime.generate", str(tiny_fused),
                           "--prompt", "Hello", "--max-new-tokens", "6", "--stream",
                           "--temperature", "0.8", "--seed", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = Model(tiny_fused).generate("Hello", max_new_tokens=6, temperature=0.8, seed=3)
    assert proc.stdout == "Hello" + expected.text + "\n"


def test_optimum_style_folder_runs(tiny_checkpoint, tiny_standard, tmp_path):
    """A folder laid out as `optimum-cli export onnx --task text-generation-with-past` writes
    it (model.onnx + config.json + tokenizer files, no manifest) loads and generates."""
    folder = tmp_path / "optimum_like"
    folder.mkdir()
    shutil.copy(tiny_standard / "model.onnx", folder / "model.onnx")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, folder / name)
    ours = Model(tiny_standard).generate("Hello", max_new_tokens=8).token_ids
    theirs = Model(folder)
    assert theirs.manifest.layout == "standard"
    assert theirs.generate("Hello", max_new_tokens=8).token_ids == ours
