"""The bench's onnxruntime-genai engine (its own venv, our standard folder) decodes the
same greedy tokens as our engine, batched too, through the bench's worker protocol."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from gpt2onnx.bench.measurements import worker_env
from gpt2onnx.bench.variants import KIND_GENAI, OursEngine
from tests.peer_venv import GENAI_PYTHON, requires_genai


@requires_genai
def test_genai_worker_decodes_our_tokens(tiny_standard: Path) -> None:
    prompt, new = [464, 2068, 7586, 21831], 12
    spec = json.dumps({"kind": KIND_GENAI, "folder": str(tiny_standard)})
    commands = "".join(json.dumps(c) + "\n" for c in (
        {"op": "decode", "prompt": prompt, "new_tokens": new, "batch": 1},
        {"op": "decode", "prompt": prompt, "new_tokens": new, "batch": 3},
        {"op": "decode", "prompt": prompt, "new_tokens": new, "batch": 1, "sampled": True},
        {"op": "decode", "prompt": prompt, "new_tokens": new, "batch": 1, "sampled": True},
        {"op": "quit"}))
    done = subprocess.run([str(GENAI_PYTHON), "-m", "gpt2onnx.bench.worker", spec],
                          input=commands, capture_output=True, text=True, timeout=300,
                          env=worker_env())
    assert done.returncode == 0, done.stderr[-2000:]
    ready, alone, batched, sampled, again = (json.loads(line)
                                             for line in done.stdout.splitlines())
    assert ready["ok"] and ready["info"]["onnxruntime_genai"] and ready["info"]["samples"]
    # Seeded sampling: the same tokens twice, and a full run of them.
    assert sampled["tokens"] == again["tokens"] and len(sampled["tokens"]) == new
    ours = OursEngine(str(tiny_standard)).decode(prompt, new, 1)
    assert alone["tokens"] == ours.tokens
    assert batched["tokens"] == ours.tokens
    assert len(alone["step_ms"]) == new - 1
