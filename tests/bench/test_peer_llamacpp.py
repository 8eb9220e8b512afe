"""The bench's llama.cpp peer (issue 17): the GGUF f32 file of a tiny random checkpoint
decodes transformers' greedy tokens through gen_ids, at batch 1 and as row 0 of a batch,
and through the bench's worker protocol; the quantized files load and decode; sampling
is seeded."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gpt2onnx.bench import peer_llamacpp as llama
from gpt2onnx.bench.measurements import worker_env
from gpt2onnx.bench.variants import KIND_LLAMACPP, TorchLoopEngine

requires_llamacpp = pytest.mark.skipif(
    llama.build_version() is None or not (llama.REPO / llama.LLAMACPP_VENV).exists(),
    reason=f"needs the llama.cpp build and {llama.LLAMACPP_VENV}: run {llama.SETUP}")

PROMPT, NEW = [464, 2068, 7586, 21831, 18045, 625], 24


@pytest.fixture(scope="module")
def varied_checkpoint(make_checkpoint: Callable[..., Path]) -> Path:
    """TINY with 10x the default init scale: at 0.02 the greedy text is one token over and
    over, which would agree with almost anything; this one's has ~20 distinct tokens."""
    return make_checkpoint(initializer_range=0.2)


@pytest.fixture(scope="module")
def ggufs(varied_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Path]:
    return llama.gguf_files(tmp_path_factory.mktemp("llamacpp"), varied_checkpoint)


@requires_llamacpp
def test_f32_greedy_equals_transformers(varied_checkpoint: Path, ggufs: dict[str, Path]
                                        ) -> None:
    want = TorchLoopEngine(str(varied_checkpoint), cached=True).decode(PROMPT, NEW, 1).tokens
    assert len(set(want)) > 5  # a text that can tell two models apart
    engine = llama.LlamaCppEngine(str(ggufs["fp32"]), threads=2)
    alone = engine.decode(PROMPT, NEW, 1)
    assert alone.tokens == want
    assert len(alone.step_ms) == NEW - 1 and alone.prefill_ms > 0
    # Row 0 of a batch: the other rows are separate sequences and must not leak into it.
    assert engine.decode(PROMPT, NEW, 3).tokens == want
    assert engine.info()["kv_cache"] == "f32"
    # Sampled (config.SAMPLING): seeded, so a rerun draws the same text.
    drawn = engine.decode(PROMPT, 8, 1, sampled=True).tokens
    assert drawn == engine.decode(PROMPT, 8, 1, sampled=True).tokens != want[:8]


@requires_llamacpp
def test_worker_protocol_and_quantized_files(ggufs: dict[str, Path]) -> None:
    for precision, gguf_type in llama.GGUF_TYPE.items():
        marker = json.loads((ggufs[precision] / llama.MARKER).read_text())
        assert marker["gguf_type"] == gguf_type
    spec = json.dumps({"kind": KIND_LLAMACPP, "folder": str(ggufs["int4"])})
    commands = "".join(json.dumps(c) + "\n" for c in (
        {"op": "decode", "prompt": PROMPT, "new_tokens": 5, "batch": 2}, {"op": "quit"}))
    done = subprocess.run([sys.executable, "-m", "gpt2onnx.bench.worker", spec],
                          input=commands, capture_output=True, text=True, timeout=300,
                          env=worker_env())
    assert done.returncode == 0, done.stderr[-2000:]
    ready, run = (json.loads(line) for line in done.stdout.splitlines())
    assert ready["info"]["gguf_type"] == "q4_0"
    assert len(run["tokens"]) == 5 and len(run["step_ms"]) == 4


@requires_llamacpp
def test_too_long_is_one_line(ggufs: dict[str, Path]) -> None:
    engine = llama.LlamaCppEngine(str(ggufs["fp32"]), threads=1)
    with pytest.raises(RuntimeError, match="exceeds the model's context 128"):
        engine.decode(PROMPT, 200, 1)
