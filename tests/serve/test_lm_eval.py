"""lm-evaluation-harness against our server: its `local-completions` model scores the same
loglikelihoods and rolling perplexities as its own `hf` backend on the same checkpoint.

What lm-eval sends (lm-eval 0.4.13, `local-completions`, tokenized_requests=True, batch 1),
one POST /v1/completions per (context, continuation) pair, recorded by the runner below:

    {"model": "tiny", "prompt": [[50256, 464, 3290, ...]],  # token ids, a batch of one
     "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}

It reads choices[0].logprobs.token_logprobs[ctxlen:-1] (the continuation's tokens; the
last entry is the one generated token) and compares each with max(top_logprobs[i]) for
is_greedy. A rolling (perplexity) window is the same call with the previous token (EOS
for the first window) as the one-token context. With max_length=128 lm-eval sends at most
127 prompt tokens (+ 1 generated = the full 128 context); its windows are then 126 tokens,
so the `hf` side runs with max_length=126 to cut the same windows.

Both backends run in subprocesses of this venv's python (offline, a private datasets
cache), with the local tasks in tests/data/lm_eval_tasks as the working directory.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.helpers import wait_until

pytest.importorskip("lm_eval")

TASKS_DIR = Path(__file__).parents[1] / "data" / "lm_eval_tasks"
TASKS = ["gpt2onnx_mc", "gpt2onnx_rolling"]
SERVED_NAME = "tiny"
CONTEXT = 128  # the TINY checkpoint's n_positions
# 16 questions x 4 choices, and 5 texts in 6 windows (the last one needs two).
EXPECTED_REQUESTS = 16 * 4 + 6

# argv: backend, model_args (JSON), output file. Records the request bodies it POSTs.
RUNNER = """
import json, sys
import requests
import lm_eval
from lm_eval.tasks import TaskManager

backend, model_args, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
batch_size = int(sys.argv[4]) if len(sys.argv) > 4 else 1
payloads = []
post = requests.post

def recording_post(url, *args, **kwargs):
    payloads.append(kwargs.get("json"))
    return post(url, *args, **kwargs)

requests.post = recording_post
try:
    manager = TaskManager(include_path=".", include_defaults=False)
except TypeError:  # older lm-eval: no include_defaults
    manager = TaskManager(include_path=".")
res = lm_eval.simple_evaluate(model=backend, model_args=model_args, tasks=TASKS,
                              task_manager=manager, batch_size=batch_size, log_samples=True,
                              bootstrap_iters=0)
samples = {task: sorted(({"doc_id": s["doc_id"], "resps": s["resps"]} for s in rows),
                        key=lambda s: s["doc_id"])
           for task, rows in res["samples"].items()}
with open(out, "w") as handle:
    json.dump({"results": res["results"], "samples": samples, "payloads": payloads},
              handle, default=str)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_lm_eval(backend: str, model_args: dict[str, Any], out: Path, env: dict[str, str],
                  batch_size: int = 1) -> subprocess.Popen[str]:
    script = f"TASKS = {TASKS!r}\n{RUNNER}"
    return subprocess.Popen([sys.executable, "-c", script, backend, json.dumps(model_args),
                             str(out), str(batch_size)], cwd=TASKS_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], out: Path, what: str) -> dict[str, Any]:
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    assert proc.returncode == 0, f"lm-eval ({what}) failed:\n{log[-6000:]}"
    return json.loads(out.read_text())


def scores(resps: list[Any]) -> list[tuple[float, bool | None]]:
    """A sample's per-request (loglikelihood, is_greedy); rolling requests have no flag."""
    rows = []
    for resp in resps:
        value = resp[0]
        rows.append((float(value[0]), bool(value[1])) if isinstance(value, list)
                    else (float(value), None))
    return rows


def test_local_completions_matches_hf_backend(tiny_checkpoint: Path, tiny_fused: Path,
                                              tmp_path: Path) -> None:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "gpt2onnx.serve", str(tiny_fused),
                               "--port", str(port), "--served-model-name", SERVED_NAME,
                               "--log-level", "warning"])
    hf = api = batched = None
    try:
        hf = start_lm_eval("hf", {"pretrained": str(tiny_checkpoint), "device": "cpu",
                                  "dtype": "float32", "max_length": CONTEXT - 2},
                           tmp_path / "hf.json", env)
        assert wait_until(lambda: healthy(url), timeout=60), "server did not become healthy"
        api = start_lm_eval("local-completions", {
            "model": SERVED_NAME, "base_url": f"{url}/v1/completions",
            "tokenizer": str(tiny_checkpoint), "tokenizer_backend": "huggingface",
            "max_length": CONTEXT, "num_concurrent": 1, "max_retries": 1},
            tmp_path / "api.json", env)
        ours = finish(api, tmp_path / "api.json", "local-completions")
        # --batch_size 16: 16 prompts per request, more than the server's default slots
        # leave free when others run; they queue row by row (issue 14).
        batched = start_lm_eval("local-completions", {
            "model": SERVED_NAME, "base_url": f"{url}/v1/completions",
            "tokenizer": str(tiny_checkpoint), "tokenizer_backend": "huggingface",
            "max_length": CONTEXT, "num_concurrent": 1, "max_retries": 1},
            tmp_path / "batched.json", env, batch_size=16)
        in_batches = finish(batched, tmp_path / "batched.json", "local-completions batch 16")
        ref = finish(hf, tmp_path / "hf.json", "hf")
    finally:
        for proc in (api, batched, hf, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    # The calls went out as described at the top: token ids, echo, one logprob, one token.
    payloads = ours["payloads"]
    assert len(payloads) == EXPECTED_REQUESTS
    for body in payloads:
        assert body.keys() >= {"prompt", "echo", "logprobs", "max_tokens", "model"}
        assert (body["echo"], body["logprobs"], body["max_tokens"], body["model"]) == \
            (True, 1, 1, SERVED_NAME)
        assert len(body["prompt"]) == 1 and all(isinstance(t, int) for t in body["prompt"][0])
    # The long text's first window fills the context: 127 prompt tokens + 1 generated.
    assert max(len(body["prompt"][0]) for body in payloads) == CONTEXT - 1

    assert max(len(body["prompt"]) for body in in_batches["payloads"]) == 16
    # Every request's loglikelihood (and is_greedy), not just the aggregates; batch 1 and
    # batch 16 alike.
    for task in TASKS:
        assert len(ours["samples"][task]) == len(ref["samples"][task]) > 0
        for mine, theirs in [*zip(ours["samples"][task], ref["samples"][task], strict=True),
                             *zip(in_batches["samples"][task], ref["samples"][task],
                                  strict=True)]:
            assert mine["doc_id"] == theirs["doc_id"]
            got, want = scores(mine["resps"]), scores(theirs["resps"])
            assert len(got) == len(want)
            for (ll, greedy), (ref_ll, ref_greedy) in zip(got, want, strict=True):
                assert math.isclose(ll, ref_ll, rel_tol=1e-4), (task, mine["doc_id"], ll, ref_ll)
                assert greedy == ref_greedy, (task, mine["doc_id"])

    # The metrics, to 4 significant digits (accuracies exactly).
    metrics = {"gpt2onnx_mc": ["acc", "acc_norm"],
               "gpt2onnx_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"]}
    for task, names in metrics.items():
        for name, run in [(n, r) for n in names for r in (ours, in_batches)]:
            got, want = run["results"][task][f"{name},none"], ref["results"][task][f"{name},none"]
            if name.startswith("acc"):
                assert got == want, (task, name, got, want)
            else:
                assert math.isfinite(want) and want > 0, (task, name, want)
                assert math.isclose(got, want, rel_tol=1e-4), (task, name, got, want)
