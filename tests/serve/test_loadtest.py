"""The load generator against a live server: the figures it reports add up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from gpt2onnx import loadtest
from gpt2onnx.serve import Engine
from tests.serve.helpers import LiveServer

PAYLOAD = {"prompt": "Measure me", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def test_streaming_run_reports_latencies_and_throughput(
        module_engine: Engine, live_server: Callable[..., LiveServer]) -> None:
    server = live_server(module_engine)
    report = asyncio.run(loadtest.run_load(server.url, 4, 10, {**PAYLOAD, "stream": True}))
    assert (report.completed, report.failed) == (10, 0)
    assert report.output_tokens == 80 and report.prompt_tokens > 0
    assert report.ttft_ms and report.tpot_ms and report.itl_ms
    assert 0 < report.ttft_ms["median"] <= report.latency_ms["median"]
    assert report.output_throughput == pytest.approx(80 / report.duration_s)


def test_cli_non_streaming_and_json(module_engine: Engine,
                                    live_server: Callable[..., LiveServer],
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = live_server(module_engine)
    out = tmp_path / "report.json"
    rc = loadtest.main([server.url + "/v1", "--concurrency", "2", "--requests", "4",
                        "--max-tokens", "5", "--json", str(out)])
    assert rc == 0
    assert "Successful requests:                    4" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["output_tokens"] == 20 and report["ttft_ms"] is None


def test_failures_are_counted_not_raised(module_engine: Engine,
                                         live_server: Callable[..., LiveServer]) -> None:
    server = live_server(module_engine, api_key="secret")
    report = asyncio.run(loadtest.run_load(server.url, 2, 3, {**PAYLOAD, "model": "tiny"}))
    assert (report.completed, report.failed) == (0, 3)
    assert report.errors and "HTTP 401" in report.errors[0]


def test_request_rate_spaces_the_arrivals(module_engine: Engine,
                                          live_server: Callable[..., LiveServer]) -> None:
    server = live_server(module_engine)
    report = asyncio.run(loadtest.run_load(server.url, 4, 6, {**PAYLOAD, "stream": True},
                                           request_rate=20.0, seed=1))
    assert (report.completed, report.failed, report.request_rate) == (6, 0, 20.0)
    assert report.duration_s >= 0.1  # five exponential gaps averaging 50 ms
