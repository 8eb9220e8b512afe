"""guidellm against our server: its default request format (the openai_http backend, streaming
POST /v1/chat/completions) completes every request of a small benchmark without an error.

guidellm pulls in torch and its own transformers, so it lives in a venv of its own and is run
as an executable: $GUIDELLM (a path to it), else `guidellm` on PATH, else the test is skipped.
What guidellm 0.8.1 sends, one request per synthetic prompt:

    {"model": "tiny", "stream": true,
     "stream_options": {"include_usage": true, "continuous_usage_stats": true},
     "max_completion_tokens": 8, "ignore_eos": true,
     "messages": [{"role": "user", "content": [{"type": "text", "text": "..."}]}]}

(after GET /health and GET /v1/models). It counts tokens from the final usage chunk, so the
output token total also checks that max_completion_tokens and ignore_eos were honoured. It
builds its prompts with the model folder's own tokenizer (tokenizer.json and
tokenizer_config.json, loaded by transformers' AutoTokenizer from the path), offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serve.helpers import free_port, healthy, wait_until

SERVED_NAME = "tiny"
REQUESTS = 6
STREAMS = 2  # concurrent streams: the engine batches two chats at a time
PROMPT_TOKENS, OUTPUT_TOKENS = 16, 8  # + the template's EOS: well inside the 128 context
GUIDELLM = os.environ.get("GUIDELLM") or shutil.which("guidellm")

pytestmark = pytest.mark.skipif(
    GUIDELLM is None, reason="guidellm is not installed (set GUIDELLM=/path/to/guidellm)")


def metric(text: str, outcome: str) -> float:
    match = re.search(rf'^gpt2onnx_requests_total\{{outcome="{outcome}"\}} (\S+)$', text,
                      re.MULTILINE)
    assert match, f"no gpt2onnx_requests_total{{outcome={outcome!r}}} in /metrics"
    return float(match.group(1))


def test_guidellm_chat_benchmark_completes_without_errors(tiny_fused: Path,
                                                          tmp_path: Path) -> None:
    assert os.access(str(GUIDELLM), os.X_OK), f"GUIDELLM={GUIDELLM!r} is not an executable"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = tmp_path / "server.log"
    with server_log.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "gpt2onnx.serve", str(tiny_fused), "--port", str(port),
             "--served-model-name", SERVED_NAME, "--chat-template", "dialogpt"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: healthy(url), timeout=60), \
            f"server did not become healthy:\n{server_log.read_text()}"
        report = tmp_path / "benchmarks.json"
        command = [
            str(GUIDELLM), "run",
            "--backend", f"kind=openai_http,target={url},model={SERVED_NAME}",
            "--tokenizer", f"kind=hf_auto,model={tiny_fused}",
            "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},"
                      f"output_tokens={OUTPUT_TOKENS}",
            "--profile", f"kind=concurrent,streams={STREAMS}",
            "--constraint", f"kind=max_requests,count={REQUESTS}",
            "--output", f"kind=json,path={report}",
            "--disable-console",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUIDELLM")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   HF_HOME=str(tmp_path / "hf-home"), NO_COLOR="1")
        done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env=env)
        output = f"{done.stdout}\n{done.stderr}"[-6000:]
        assert done.returncode == 0, \
            f"guidellm failed ({done.returncode}):\n{output}\nserver:\n{server_log.read_text()}"
        assert report.is_file(), f"guidellm wrote no report:\n{output}"

        [benchmark] = json.loads(report.read_text())["benchmarks"]
        totals = benchmark["metrics"]["request_totals"]
        errored = benchmark["requests"]["errored"]
        assert totals == {"successful": REQUESTS, "errored": 0, "incomplete": 0,
                          "total": REQUESTS}, (totals, [e["info"]["error"] for e in errored])
        metrics = benchmark["metrics"]
        # Streamed: a first token was seen for every request; and the usage chunk's
        # completion_tokens say each produced exactly max_completion_tokens (ignore_eos).
        assert metrics["time_to_first_token_ms"]["successful"]["count"] == REQUESTS
        assert metrics["output_token_count"]["successful"]["total_sum"] == \
            REQUESTS * OUTPUT_TOKENS

        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert metric(text, "success") == REQUESTS
        for outcome in ("bad_request", "rejected", "cancelled", "timeout", "error"):
            assert metric(text, outcome) == 0, outcome
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
