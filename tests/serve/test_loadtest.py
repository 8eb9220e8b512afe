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


def test_output_lengths_spread_reproducibly() -> None:
    lengths = loadtest.output_lengths(64, 0.5, 400, seed=3)
    assert lengths == loadtest.output_lengths(64, 0.5, 400, seed=3)
    assert min(lengths) >= 32 and max(lengths) <= 96 and len(set(lengths)) > 30
    assert loadtest.output_lengths(64, 0.0, 5, seed=3) == [64] * 5
    assert loadtest.output_lengths(1, 0.9, 50, seed=0) == [1] * 50  # never below 1
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="range_ratio"):
            loadtest.output_lengths(64, bad, 1, seed=0)


def test_random_range_ratio_reaches_the_server(module_engine: Engine,
                                               live_server: Callable[..., LiveServer]) -> None:
    server = live_server(module_engine)
    report = asyncio.run(loadtest.run_load(server.url, 2, 6, {**PAYLOAD, "stream": True},
                                           seed=5, range_ratio=0.5))
    assert (report.completed, report.failed) == (6, 0)
    # ignore_eos: every request generates exactly its drawn length
    assert report.output_tokens == sum(loadtest.output_lengths(8, 0.5, 6, seed=6))
    # closed loop: the requests after the opening burst of 2 are reported on their own
    assert report.ttft_after_burst_ms is not None


def test_cli_rejects_bad_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    for args, word in ((["--random-range-ratio", "1.5"], "random-range-ratio"),
                       (["--max-tokens", "0"], "max-tokens"),
                       (["--goodput", "ttft=50"], "KEY:MS"),
                       (["--goodput", "ttft:50"], "needs --stream")):
        with pytest.raises(SystemExit) as exc:
            loadtest.parse_args(["http://127.0.0.1:9", *args])
        assert exc.value.code == 2
        assert word in capsys.readouterr().err


def test_goodput_counts_requests_within_every_objective() -> None:
    fast = loadtest.RequestResult(True, 0.5, ttft_s=0.02, output_tokens=11)  # tpot 48 ms
    slow = loadtest.RequestResult(True, 0.5, ttft_s=0.2, output_tokens=11)  # tpot 30 ms
    failed = loadtest.RequestResult(False, 0.01, error="HTTP 500")
    unstreamed = loadtest.RequestResult(True, 0.3, output_tokens=11)
    slo = loadtest.parse_goodput(["ttft:50", "tpot:50"])
    assert slo == {"ttft": 50.0, "tpot": 50.0}
    assert [loadtest.meets(r, slo) for r in (fast, slow, failed, unstreamed)] == [
        True, False, False, False]
    report = loadtest.summarize("u", "m", 4, None, True, [fast, slow, failed, unstreamed], 2.0,
                                slo)
    assert (report.good_requests, report.request_goodput) == (1, 0.5)
    assert "Requests within ttft <= 50 ms, tpot <= 50 ms:" in loadtest.format_report(report)
    assert loadtest.summarize("u", "m", 4, None, True, [fast], 1.0).good_requests is None
    one_token = loadtest.RequestResult(True, 0.03, ttft_s=0.03, output_tokens=1)
    assert loadtest.meets(one_token, slo)  # no time per output token: 0, as vllm counts it
    for bad in ("ttft", "ttft:-1", "ttft:x", "latency:50", "tpot:nan"):
        with pytest.raises(ValueError, match="KEY:MS"):
            loadtest.parse_goodput([bad])


def test_goodput_against_a_live_server(module_engine: Engine,
                                       live_server: Callable[..., LiveServer],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    server = live_server(module_engine)
    generous, impossible = {"ttft": 60_000.0}, {"ttft": 1e-6}
    for slo, good in ((generous, 4), (impossible, 0)):
        report = asyncio.run(loadtest.run_load(server.url, 2, 4, {**PAYLOAD, "stream": True},
                                               goodput=slo))
        assert report.good_requests == good and report.completed == 4
    rc = loadtest.main([server.url, "--requests", "2", "--stream", "--goodput", "ttft:60000",
                        "e2el:60000"])
    assert rc == 0 and "Requests within ttft <= 60000 ms, e2el <= 60000 ms:" in (
        capsys.readouterr().out)


def test_distinct_prompts_differ_per_request(module_engine: Engine,
                                             live_server: Callable[..., LiveServer]) -> None:
    server = live_server(module_engine)
    same = asyncio.run(loadtest.run_load(server.url, 2, 3, PAYLOAD, distinct_prompts=False))
    distinct = asyncio.run(loadtest.run_load(server.url, 2, 3, PAYLOAD))  # the default
    assert (same.completed, distinct.completed) == (3, 3)
    # " #0", " #1", " #2" add tokens to every prompt
    assert distinct.prompt_tokens > same.prompt_tokens
