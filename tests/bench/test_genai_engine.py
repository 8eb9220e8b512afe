"""The bench's onnxruntime-genai engine (its own venv, our standard folder) decodes the
same greedy tokens as our engine, batched too, through the bench's worker protocol."""

from __future__ import annotations

from pathlib import Path

from gpt2onnx.bench.variants import KIND_GENAI, OursEngine
from tests.bench.helpers import decode, worker_replies
from tests.peer_venv import GENAI_PYTHON, requires_genai


@requires_genai
def test_genai_worker_decodes_our_tokens(tiny_standard: Path) -> None:
    prompt, new = [464, 2068, 7586, 21831], 12
    ready, alone, batched, sampled, again = worker_replies(
        GENAI_PYTHON, KIND_GENAI, tiny_standard,
        [decode(prompt, new), decode(prompt, new, 3), decode(prompt, new, sampled=True),
         decode(prompt, new, sampled=True)])
    assert ready["ok"] and ready["info"]["onnxruntime_genai"] and ready["info"]["samples"]
    # Seeded sampling: the same tokens twice, and a full run of them.
    assert sampled["tokens"] == again["tokens"] and len(sampled["tokens"]) == new
    ours = OursEngine(str(tiny_standard)).decode(prompt, new, 1)
    assert alone["tokens"] == ours.tokens
    assert batched["tokens"] == ours.tokens
    assert len(alone["step_ms"]) == new - 1
