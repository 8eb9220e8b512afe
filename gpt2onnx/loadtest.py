"""python -m gpt2onnx.loadtest URL --concurrency C --requests N [--stream] [--request-rate R]

Sends N completion requests, at most C in flight, to an OpenAI-compatible server and
reports what ``vllm bench serve`` reports: request and token throughput, time to first
token (TTFT), time per output token after the first (TPOT), inter-token latency (ITL) and
failures. By default each client sends its next request as soon as the last one ends
(closed loop); ``--request-rate`` starts requests at Poisson-distributed times instead, as
``vllm bench serve --request-rate`` does. TTFT, TPOT and ITL need ``--stream``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

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
    tpot_ms: dict[str, float] | None
    itl_ms: dict[str, float] | None
    errors: list[str]


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


async def run_load(url: str, concurrency: int, requests: int, payload: dict[str, Any],
                   api_key: str | None = None, timeout_s: float = 600.0,
                   request_rate: float = math.inf, seed: int = 0) -> LoadReport:
    """Send ``requests`` copies of ``payload``, at most ``concurrency`` in flight, started
    ``request_rate`` per second on average (inf: all at once, i.e. a closed loop)."""
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

        async def one() -> RequestResult:
            async with gate:
                return await one_request(client, url, payload)

        start = time.perf_counter()
        tasks = []
        for _ in range(requests):
            tasks.append(asyncio.create_task(one()))
            if math.isfinite(request_rate):
                await asyncio.sleep(gaps.expovariate(request_rate))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    rate = request_rate if math.isfinite(request_rate) else None
    return summarize(url, str(payload["model"]), concurrency, rate,
                     bool(payload.get("stream")), results, duration)


async def served_model(client: httpx.AsyncClient, completions: str) -> str:
    response = await client.get(completions.rsplit("/completions", 1)[0] + "/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def summarize(url: str, model: str, concurrency: int, request_rate: float | None, stream: bool,
              results: list[RequestResult], duration: float) -> LoadReport:
    ok = [r for r in results if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    itl = [g for r in ok for g in r.itl_s]
    return LoadReport(
        url=url, model=model, concurrency=concurrency, request_rate=request_rate,
        stream=stream, completed=len(ok),
        failed=len(results) - len(ok), duration_s=duration, prompt_tokens=prompt_tokens,
        output_tokens=output_tokens, request_throughput=len(ok) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(prompt_tokens + output_tokens) / duration,
        latency_ms=_stats([r.latency_s for r in ok]), ttft_ms=_stats(ttft) if ttft else None,
        tpot_ms=_stats(tpot) if tpot else None, itl_ms=_stats(itl) if itl else None,
        errors=sorted({r.error for r in results if r.error})[:5])


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in seconds)
    if not ms:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"mean": statistics.fmean(ms), "median": statistics.median(ms), "p99": p99}


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
    for title, short, stats in (
            ("Time to First Token", "TTFT", r.ttft_ms),
            ("Time per Output Token (excl. 1st token)", "TPOT", r.tpot_ms),
            ("Inter-token Latency", "ITL", r.itl_ms),
            ("End-to-end Latency", "E2EL", r.latency_ms)):
        if stats is None:
            continue
        lines.append(f"{' ' + title + ' ':-^60}")
        for key in ("mean", "median", "p99"):
            label = f"{key.capitalize() if key != 'p99' else 'P99'} {short} (ms):"
            lines.append(f"{label:<40}{stats[key]:.2f}")
    for error in r.errors:
        lines.append(f"error: {error}")
    lines.append("=" * 60)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpt2onnx.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    p.add_argument("--requests", type=int, default=32, help="requests in total")
    p.add_argument("--stream", action="store_true", help="stream (measures TTFT/TPOT/ITL)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests started per second, Poisson (default: inf, closed loop)")
    p.add_argument("--seed", type=int, default=0, help="seeds the request arrival times")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --max-tokens tokens (default: on)")
    p.add_argument("--model", default=None, help="model id (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report here")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1:
        p.error("--concurrency and --requests must be >= 1")
    if not args.request_rate > 0:
        p.error("--request-rate must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    payload: dict[str, Any] = {"prompt": args.prompt, "max_tokens": args.max_tokens,
                               "temperature": args.temperature, "stream": args.stream,
                               "ignore_eos": args.ignore_eos}
    if args.model:
        payload["model"] = args.model
    try:
        report = asyncio.run(run_load(args.url, args.concurrency, args.requests, payload,
                                      args.api_key, args.timeout, args.request_rate,
                                      args.seed))
    except httpx.HTTPStatusError as exc:
        print(f"error: {exc.request.url} answered {exc.response.status_code}; pass --model "
              "(and --api-key if the server needs one).", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(asdict(report), handle, indent=2)
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
