"""python -m gpt2onnx.loadtest URL --concurrency C --requests N [--stream] [--request-rate R]

Sends N completion requests, at most C in flight, to an OpenAI-compatible server and
reports what ``vllm bench serve`` reports: request and token throughput, time to first
token (TTFT), time per output token after the first (TPOT), inter-token latency (ITL) and
failures. By default each client sends its next request as soon as the last one ends
(closed loop); ``--request-rate`` starts requests at Poisson-distributed times instead, as
``vllm bench serve --request-rate`` does. ``--random-range-ratio`` draws each request's
output length around ``--max-tokens``, as vllm's random dataset does: clients whose
requests all end at the same step keep arriving together, which real traffic does not.
TTFT, TPOT and ITL need ``--stream``. ``--goodput ttft:MS tpot:MS e2el:MS`` counts the
requests that met every such service-level objective, as vllm's ``--goodput`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gpt2onnx.cli import Parser, float_in, int_in, run_main, utf8_text
from gpt2onnx.runtime.params import MAX_TEMPERATURE

# Each request in flight holds a connection (a file descriptor) and a task: far beyond what
# one client process can drive, and what a typo like 10**6 would try to open.
MAX_CONCURRENCY = 10_000
MAX_TIMEOUT_S = 86_400.0  # a day: longer is a typo, and asyncio rejects huge timeouts
DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning"


@dataclass
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float | None = None  # streaming only
    prompt_tokens: int = 0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # gaps between text chunks
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class LoadReport:
    url: str
    model: str
    concurrency: int
    request_rate: float | None  # requests started per second; None: closed loop
    stream: bool
    completed: int
    failed: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # generated tokens / s, all clients together
    total_token_throughput: float
    latency_ms: dict[str, float]
    ttft_ms: dict[str, float] | None
    # Closed loop only: TTFT of the requests after the first ``concurrency``, which all
    # start at once by construction (the opening burst is prefilled together).
    ttft_after_burst_ms: dict[str, float] | None
    tpot_ms: dict[str, float] | None
    itl_ms: dict[str, float] | None
    errors: list[str]
    goodput_slo_ms: dict[str, float] = field(default_factory=dict)  # e.g. {"ttft": 60}
    good_requests: int | None = None  # completed requests within every SLO
    request_goodput: float | None = None  # good requests / s


SLO_KEYS = ("ttft", "tpot", "e2el")


def parse_goodput(items: list[str]) -> dict[str, float]:
    """``["ttft:60", "tpot:40"]`` -> {"ttft": 60.0, "tpot": 40.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for item in items:
        key, _, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if key not in SLO_KEYS or not (math.isfinite(ms) and ms > 0):
            raise ValueError(f"goodput objective {item!r} is not KEY:MS with KEY one of "
                             f"{', '.join(SLO_KEYS)} and MS a positive number; e.g. ttft:60")
        slo[key] = ms
    return slo


def meets(result: RequestResult, slo: dict[str, float]) -> bool:
    """Whether a request met every objective (a missing measurement does not)."""
    # As vllm does: a completion of one token has no time per output token; it counts 0.
    tpot = result.tpot_s if result.output_tokens > 1 else 0.0
    got = {"ttft": result.ttft_s, "tpot": tpot, "e2el": result.latency_s}
    for key, limit_ms in slo.items():
        value = got[key]
        if not result.ok or value is None or value * 1e3 > limit_ms:
            return False
    return True


def completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/v1/completions"):
        return url
    return url + ("/completions" if url.endswith("/v1") else "/v1/completions")


async def one_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any]
                      ) -> RequestResult:
    start = time.perf_counter()
    try:
        if payload.get("stream"):
            return await _streamed(client, url, payload, start)
        response = await client.post(url, json=payload)
        latency = time.perf_counter() - start
        if response.status_code != 200:
            return RequestResult(False, latency, error=f"HTTP {response.status_code}: "
                                 f"{response.text[:200]}")
        usage = response.json()["usage"]
        return RequestResult(True, latency, prompt_tokens=usage["prompt_tokens"],
                             output_tokens=usage["completion_tokens"])
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return RequestResult(False, time.perf_counter() - start,
                             error=f"{type(exc).__name__}: {exc}")


async def _streamed(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                    start: float) -> RequestResult:
    result = RequestResult(False, 0.0)
    last = start
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            return RequestResult(False, time.perf_counter() - start,
                                 error=f"HTTP {response.status_code}: {body[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                result.ok = result.error is None
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = chunk["error"].get("message", "error")
                continue
            now = time.perf_counter()
            if chunk.get("usage"):
                result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                if result.ttft_s is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
    result.latency_s = time.perf_counter() - start
    if not result.ok and result.error is None:
        result.error = "the stream ended without [DONE]"
    return result


def output_lengths(max_tokens: int, range_ratio: float, count: int, seed: int) -> list[int]:
    """Each request's ``max_tokens``: uniform in [max_tokens * (1 - r), max_tokens * (1 + r)]
    (at least 1), reproducible from ``seed``; all equal when r is 0."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio!r}")
    low = max(1, int(max_tokens * (1 - range_ratio)))
    high = max(low, int(max_tokens * (1 + range_ratio)))
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(count)]


async def run_load(url: str, concurrency: int, requests: int, payload: dict[str, Any],
                   api_key: str | None = None, timeout_s: float = 600.0,
                   request_rate: float = math.inf, seed: int = 0,
                   range_ratio: float = 0.0, goodput: dict[str, float] | None = None,
                   distinct_prompts: bool = True) -> LoadReport:
    """Send ``requests`` copies of ``payload``, at most ``concurrency`` in flight, started
    ``request_rate`` per second on average (inf: all at once, i.e. a closed loop); with
    ``range_ratio``, each copy's ``max_tokens`` is drawn around the payload's; with
    ``distinct_prompts`` (the default), request i's prompt ends in " #i", so no two are
    the same and a server cannot answer a repeated prompt from one prefill."""
    url = completions_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout_s) as client:
        if "model" not in payload:
            payload = {**payload, "model": await served_model(client, url)}
        if payload.get("stream"):
            payload = {**payload, "stream_options": {"include_usage": True}}
        gate = asyncio.Semaphore(concurrency)
        gaps = random.Random(seed)
        lengths = output_lengths(int(payload.get("max_tokens", 16)), range_ratio, requests,
                                 seed + 1)

        async def one(i: int, max_tokens: int) -> RequestResult:
            body = {**payload, "max_tokens": max_tokens}
            if distinct_prompts:
                body["prompt"] = f"{payload['prompt']} #{i}"
            async with gate:
                return await one_request(client, url, body)

        start = time.perf_counter()
        tasks = []
        for i, max_tokens in enumerate(lengths):
            tasks.append(asyncio.create_task(one(i, max_tokens)))
            if math.isfinite(request_rate):
                await asyncio.sleep(gaps.expovariate(request_rate))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    rate = request_rate if math.isfinite(request_rate) else None
    return summarize(url, str(payload["model"]), concurrency, rate,
                     bool(payload.get("stream")), results, duration, goodput or {})


async def served_model(client: httpx.AsyncClient, completions: str) -> str:
    response = await client.get(completions.rsplit("/completions", 1)[0] + "/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def summarize(url: str, model: str, concurrency: int, request_rate: float | None, stream: bool,
              results: list[RequestResult], duration: float,
              goodput: dict[str, float] | None = None) -> LoadReport:
    ok = [r for r in results if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    # Requests start in order and the gate admits them in order: the first ``concurrency``
    # results are the opening burst of a closed loop.
    later = [r.ttft_s for r in results[concurrency:] if r.ok and r.ttft_s is not None]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    itl = [g for r in ok for g in r.itl_s]
    report = LoadReport(
        url=url, model=model, concurrency=concurrency, request_rate=request_rate,
        stream=stream, completed=len(ok),
        failed=len(results) - len(ok), duration_s=duration, prompt_tokens=prompt_tokens,
        output_tokens=output_tokens, request_throughput=len(ok) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(prompt_tokens + output_tokens) / duration,
        latency_ms=_stats([r.latency_s for r in ok]), ttft_ms=_stats(ttft) if ttft else None,
        ttft_after_burst_ms=_stats(later) if later and request_rate is None else None,
        tpot_ms=_stats(tpot) if tpot else None, itl_ms=_stats(itl) if itl else None,
        errors=sorted({r.error for r in results if r.error})[:5])
    if goodput:
        good = sum(meets(r, goodput) for r in results)
        report.goodput_slo_ms, report.good_requests = dict(goodput), good
        report.request_goodput = good / duration
    return report


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in seconds)
    if not ms:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]

    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p90": pct(0.9),
            "p99": pct(0.99)}


def format_report(r: LoadReport) -> str:
    lines = [
        f"{' Load test result ':=^60}",
        f"{'Model:':<40}{r.model}",
        f"{'Concurrency:':<40}{r.concurrency}",
        f"{'Request rate (req/s):':<40}"
        f"{'closed loop' if r.request_rate is None else f'{r.request_rate:g} (Poisson)'}",
        f"{'Streaming:':<40}{r.stream}",
        f"{'Successful requests:':<40}{r.completed}",
        f"{'Failed requests:':<40}{r.failed}",
        f"{'Benchmark duration (s):':<40}{r.duration_s:.2f}",
        f"{'Total input tokens:':<40}{r.prompt_tokens}",
        f"{'Total generated tokens:':<40}{r.output_tokens}",
        f"{'Request throughput (req/s):':<40}{r.request_throughput:.2f}",
        f"{'Output token throughput (tok/s):':<40}{r.output_throughput:.2f}",
        f"{'Total token throughput (tok/s):':<40}{r.total_token_throughput:.2f}",
    ]
    if r.good_requests is not None and r.request_goodput is not None:
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in r.goodput_slo_ms.items())
        lines += [f"{'Request goodput (req/s):':<40}{r.request_goodput:.2f}",
                  f"{'Requests within ' + slo + ':':<40}{r.good_requests}/"
                  f"{r.completed + r.failed}"]
    for title, short, stats in (
            ("Time to First Token", "TTFT", r.ttft_ms),
            (f"TTFT after the first {r.concurrency} (opening burst)", "TTFT",
             r.ttft_after_burst_ms),
            ("Time per Output Token (excl. 1st token)", "TPOT", r.tpot_ms),
            ("Inter-token Latency", "ITL", r.itl_ms),
            ("End-to-end Latency", "E2EL", r.latency_ms)):
        if stats is None:
            continue
        lines.append(f"{' ' + title + ' ':-^60}")
        for key in ("mean", "median", "p90", "p99"):
            label = f"{key.capitalize() if key[0] != 'p' else key.upper()} {short} (ms):"
            lines.append(f"{label:<40}{stats[key]:.2f}")
    for error in r.errors:
        lines.append(f"error: {error}")
    lines.append("=" * 60)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m gpt2onnx.loadtest", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int_in(1, MAX_CONCURRENCY), default=1,
                   help=f"requests in flight at once, in [1, {MAX_CONCURRENCY}]")
    p.add_argument("--requests", type=int_in(1), default=32, help="requests in total")
    p.add_argument("--stream", action="store_true", help="stream (measures TTFT/TPOT/ITL)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests started per second, Poisson (default: inf, closed loop)")
    p.add_argument("--seed", type=int_in(0), default=0, help="seeds the request arrival times")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, type=utf8_text)
    p.add_argument("--max-tokens", type=int_in(1), default=64)
    p.add_argument("--random-range-ratio", type=float_in(0.0, 1.0), default=0.0, metavar="R",
                   help="draw each request's max_tokens uniformly in [M(1-R), M(1+R)] "
                        "(default 0: all M), like vllm bench serve's random dataset")
    p.add_argument("--temperature", type=float_in(0.0, MAX_TEMPERATURE), default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --max-tokens tokens (default: on)")
    p.add_argument("--model", default=None, type=utf8_text,
                   help="model id (default: the server's first)")
    p.add_argument("--api-key", default=None, type=utf8_text)
    p.add_argument("--timeout", type=float_in(0.0, MAX_TIMEOUT_S, low_open=True),
                   default=600.0, help="seconds per request")
    p.add_argument("--distinct-prompts", action=argparse.BooleanOptionalAction, default=True,
                   help="end request i's prompt in ' #i', so no two requests share a prompt "
                        "and a server that prefills a repeated prompt once gets no help "
                        "(default: on; --no-distinct-prompts sends --prompt as it is)")
    p.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                   help="service-level objectives in ms (ttft, tpot, e2el), e.g. ttft:60 "
                        "tpot:40: report how many requests met all of them")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report here")
    args = p.parse_args(argv)
    try:
        args.goodput = parse_goodput(args.goodput)
    except ValueError as exc:
        p.error(str(exc))
    if args.goodput.keys() & {"ttft", "tpot"} and not args.stream:
        p.error("--goodput ttft/tpot needs --stream (only a stream shows the first token)")
    if not args.request_rate > 0:
        p.error("--request-rate must be > 0")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not 0 <= args.random_range_ratio < 1:
        p.error(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.json:
        # Before the run, not after minutes of load: a report with nowhere to go is lost.
        folder = Path(args.json).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            print(f"error: --json {args.json!r}: folder {str(folder)!r} does not exist or is "
                  "not writable; pass a path in a writable folder.", file=sys.stderr)
            return 2
    payload: dict[str, Any] = {"prompt": args.prompt, "max_tokens": args.max_tokens,
                               "temperature": args.temperature, "stream": args.stream,
                               "ignore_eos": args.ignore_eos}
    if args.model:
        payload["model"] = args.model
    try:
        report = asyncio.run(run_load(args.url, args.concurrency, args.requests, payload,
                                      args.api_key, args.timeout, args.request_rate,
                                      args.seed, args.random_range_ratio, args.goodput,
                                      args.distinct_prompts))
    except httpx.HTTPStatusError as exc:
        print(f"error: {exc.request.url} answered {exc.response.status_code}; pass --model "
              "(and --api-key if the server needs one).", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    print(format_report(report), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(asdict(report), handle, indent=2)
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
