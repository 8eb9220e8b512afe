"""Every error a user can cause is typed, and its message names the value, range and fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from gpt2onnx.errors import (
    InvalidParameterError,
    ModelFolderError,
    PromptTooLongError,
    ProviderUnavailableError,
)
from gpt2onnx.runtime import GenerationParams, Model


@pytest.mark.parametrize(("kwargs", "param", "match"), [
    ({"temperature": -0.5}, "temperature", r"temperature must be >= 0 .*got -0.5"),
    ({"temperature": float("nan")}, "temperature", "temperature must be finite, got nan"),
    ({"temperature": float("inf")}, "temperature", "must be finite"),
    ({"top_p": 0.0}, "top_p", r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, "top_p", r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -1}, "top_k", "top_k must be >= 0, got -1; use 0 to disable"),
    ({"max_new_tokens": -1}, "max_new_tokens", "max_new_tokens must be >= 0, got -1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens", "must be an integer"),
    ({"repetition_penalty": 0}, "repetition_penalty", "must be > 0"),
    ({"seed": -3}, "seed", "non-negative integer"),
    ({"stop": [""]}, "stop", "non-empty strings"),
    ({"stop": [str(i) for i in range(17)]}, "stop", "at most 16 stop strings"),
    ({"on_overflow": "wrap"}, "on_overflow", "on_overflow must be one of"),
])
def test_bad_parameters(kwargs, param, match):
    with pytest.raises(InvalidParameterError, match=match) as err:
        GenerationParams(**kwargs)
    assert err.value.param == param


@pytest.fixture(scope="module")
def model(tiny_fused) -> Model:
    return Model(tiny_fused)


def test_empty_prompt(model):
    with pytest.raises(InvalidParameterError, match="prompt is empty"):
        model.generate("")
    with pytest.raises(InvalidParameterError, match="prompt is empty"):
        model.generate([])


def test_token_ids_outside_vocabulary(model):
    with pytest.raises(InvalidParameterError, match=r"token id 50257 is outside .*\[0, 50256\]"):
        model.generate([1, 50257])
    with pytest.raises(InvalidParameterError, match="token id -1"):
        model.generate([-1])


def test_prompt_longer_than_context(model):
    with pytest.raises(PromptTooLongError, match="prompt has 200 tokens; the context holds 128"):
        model.generate([1] * 200, max_new_tokens=1)


def test_prompt_plus_new_tokens_beyond_context(model):
    with pytest.raises(PromptTooLongError, match=r"at most 28 new tokens") as err:
        model.generate([1] * 100, max_new_tokens=50)
    assert err.value.param == "max_new_tokens"


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        Model(tmp_path / "nothing")


def test_folder_without_manifest(tmp_path):
    with pytest.raises(ModelFolderError, match=r"neither manifest\.json"):
        Model(tmp_path)


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_corrupt_graph_is_named(tiny_fused, tmp_path):
    folder = _copy(tiny_fused, tmp_path)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match=r"model.onnx does not match the sha256"):
        Model(folder)


def test_missing_file_is_named(tiny_fused, tmp_path):
    folder = _copy(tiny_fused, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match=r"tokenizer\.json is missing"):
        Model(folder)


def test_corrupt_manifest(tiny_fused, tmp_path):
    folder = _copy(tiny_fused, tmp_path)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        Model(folder)


def test_manifest_that_does_not_match_the_graph(tiny_fused, tmp_path):
    folder = _copy(tiny_fused, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["inputs"].append("past_key_values.7.key")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError,
                       match=r"inputs lists unexpected \['past_key_values.7.key'\]"):
        Model(folder)


def test_cuda_without_onnxruntime_gpu(tiny_fused):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ProviderUnavailableError, match="onnxruntime-gpu"):
        Model(tiny_fused, provider="cuda")
    with pytest.raises(ProviderUnavailableError, match="not one of"):
        Model(tiny_fused, provider="tpu")


def test_cli_bad_input_exits_2_with_the_message(tiny_fused):
    proc = subprocess.run([sys.executable, "-m", "gpt2onnx.runtime.generate", str(tiny_fused),
                           "--prompt", "Hi", "--top-p", "1.5"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "top_p must be in (0, 1], got 1.5" in proc.stderr



@pytest.mark.parametrize("threads", [0, -1, 100_000, 2.5, True])
def test_thread_counts_outside_the_range(tiny_fused, threads):
    # 100000 intra-op threads used to hang the load with growing memory.
    with pytest.raises(InvalidParameterError, match="threads"):
        Model(tiny_fused, threads=threads)
