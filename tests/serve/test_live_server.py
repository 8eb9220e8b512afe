"""A real uvicorn server on 127.0.0.1: many streaming clients, disconnects, overload, the
official openai client, and SIGTERM on `python -m gpt2onnx.serve`."""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpt2onnx.serve import Engine
from tests.serve.helpers import (
    MODEL_NAME,
    SLOW_SERVER,
    LiveServer,
    free_port,
    healthy,
    parse_sse,
    rss_bytes,
    slow_steps,
    stream_text,
    wait_until,
)


class PeakWatcher:
    """Samples the engine's batch and queue from a thread while a test runs."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.rows, self.waiting = engine, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            stats = self.engine.stats()
            self.rows = max(self.rows, stats.running_rows)
            self.waiting = max(self.waiting, stats.waiting)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def stream_completion(client: httpx.AsyncClient, url: str, payload: dict[str, Any]
                            ) -> tuple[int, str]:
    async with client.stream("POST", f"{url}/v1/completions",
                             json={**payload, "stream": True}) as r:
        return r.status_code, "".join([piece async for piece in r.aiter_text()])


def test_64_streaming_clients_each_get_their_single_run_text(
        make_engine: Callable[..., Engine], live_server: Callable[..., LiveServer],
        greedy_text: Callable[..., str]) -> None:
    engine = make_engine(max_batch_size=16, max_queue=64)
    server = live_server(engine)
    jobs = [(f"Client {i} asks about", 4 + (i * 7) % 37) for i in range(64)]

    async def run() -> list[tuple[int, str]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(
                stream_completion(client, server.url, {"prompt": p, "max_tokens": n,
                                                       "temperature": 0, "ignore_eos": True})
                for p, n in jobs))

    watcher = PeakWatcher(engine)
    try:
        results = asyncio.run(run())
    finally:
        watcher.stop()
    for (prompt, n), (status, body) in zip(jobs, results, strict=True):
        assert status == 200
        chunks, done = parse_sse(body)
        assert done
        assert stream_text(chunks) == greedy_text(prompt, n, stop_on_eos=False), prompt
    assert watcher.rows == 16 and watcher.waiting > 0  # a full batch, with a queue behind it
    assert wait_until(lambda: engine.stats().free_slots == 16)


def test_disconnects_free_slots_and_1000_requests_leave_nothing_behind(
        make_engine: Callable[..., Engine], live_server: Callable[..., LiveServer]) -> None:
    engine = make_engine(max_batch_size=16, max_queue=1000)
    server = live_server(engine)
    url = f"{server.url}/v1/completions"
    long = {"prompt": "Keep talking", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    short = {"prompt": "Answer briefly", "max_tokens": 2, "temperature": 0}

    async def leave_after_first_chunk(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", url, json=long) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # leaving the block closes the connection mid-stream

    async def complete(client: httpx.AsyncClient) -> None:
        r = await client.post(url, json=short)
        assert r.status_code == 200

    async def burst(count: int) -> None:
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with gate:
                await (leave_after_first_chunk if i % 2 else complete)(client)

        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(*(one(i) for i in range(count)))

    def idle() -> bool:
        s = engine.stats()
        return s.free_slots == 16 and s.running == 0 and s.waiting == 0

    asyncio.run(burst(200))  # warm: allocator pools, connection objects, histograms
    assert wait_until(idle)
    gc.collect()
    rss_before = rss_bytes()
    asyncio.run(burst(800))
    assert wait_until(idle)
    gc.collect()
    growth = rss_bytes() - rss_before
    requests = engine.metrics.requests
    assert requests.labels("cancelled")._value.get() > 0  # disconnects did cut rows short
    finished = sum(requests.labels(o)._value.get() for o in ("success", "cancelled"))
    assert finished == 1000
    print(f"RSS growth over 800 requests: {growth / 2**20:.1f} MiB")
    assert growth < 24 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 800 requests"
    assert engine.metrics.running_batch_size._value.get() == 0


def test_overload_answers_429_with_retry_after_instead_of_hanging(
        make_engine: Callable[..., Engine], live_server: Callable[..., LiveServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    slow_steps(monkeypatch, 0.01)
    engine = make_engine(max_batch_size=2, max_queue=2)
    server = live_server(engine)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20) as client:
            return await asyncio.gather(*(
                client.post(f"{server.url}/v1/completions",
                            json={"prompt": f"Busy {i}", "max_tokens": 30, "ignore_eos": True})
                for i in range(12)))

    start = time.monotonic()
    responses = asyncio.run(run())
    assert time.monotonic() - start < 20
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 4
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"


def test_the_official_openai_client_works(module_engine: Engine,
                                          live_server: Callable[..., LiveServer],
                                          greedy_text: Callable[..., str]) -> None:
    openai = pytest.importorskip("openai")
    server = live_server(module_engine, api_key="test-key")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="test-key", max_retries=0)
    expected = greedy_text("Hello there", 9, stop_on_eos=False)

    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    done = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=9,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 9

    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt="Hello there", max_tokens=9, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 9

    # Scoring as a client sends it: echo + logprobs, max_tokens 0.
    scored = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=0,
                                       echo=True, logprobs=1, temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "Hello there" and lp.token_logprobs[0] is None
    assert len(lp.token_logprobs) == len(lp.tokens) == 2 and lp.token_logprobs[1] < 0

    with pytest.raises(openai.BadRequestError, match="top_p must be in"):
        client.completions.create(model=MODEL_NAME, prompt="Hi", top_p=2.0)
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL_NAME, prompt="Hi")


def test_sigterm_finishes_in_flight_streams_then_exits(tiny_fused: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(tiny_fused), "--port",
                             str(port), "--log-level", "warning"])
    try:
        assert wait_until(lambda: healthy(url), timeout=60), "server did not become healthy"
        payload = {"prompt": "Until the end", "max_tokens": 60, "temperature": 0,
                   "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=30) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            body = "\n".join([first, *lines])
        chunks, done = parse_sse(body)
        assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once its graceful shutdown is done (exit by SIGTERM).
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("flag", "field", "low"), [
    ("--prefill-chunk", "prefill_chunk", 1), ("--max-step-tokens", "max_step_tokens", 1),
    ("--prefix-block-tokens", "prefix_block_tokens", 1),
    ("--max-queued-tokens", "max_queued_tokens", 1), ("--prefix-cache-mb", "prefix_cache_mb", 0),
])
def test_cli_scheduler_flags_are_passed_and_checked(tiny_fused: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    flag: str, field: str, low: int) -> None:
    from gpt2onnx.serve.__main__ import main, parse_args

    assert getattr(parse_args([str(tiny_fused), flag, "64"]), field.replace("-", "_")) == 64
    assert main([str(tiny_fused), flag, str(low - 1)]) == 2  # before binding a port
    err = capsys.readouterr().err
    assert field in err and f">= {low}" in err and f"got {low - 1}" in err
