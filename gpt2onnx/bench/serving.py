"""python -m gpt2onnx.bench.serving [--smoke] [--out DIR] [--baseline GITREF]

The serving engine under load: real ``python -m gpt2onnx.serve`` processes and the load
generator's own request code (``gpt2onnx.loadtest``), on the same cores, streaming:
  1. closed loop, 16 clients, distinct prompts, 64 tokens each: TTFT and output tokens/s
     (``--baseline``: the same against the engine at that git ref, runs interleaved);
  2. 16 clients whose prompts share a 200-token prefix and differ in a 16-token suffix:
     TTFT with prefix caching on and off (and the ``--baseline`` engine);
  3. one 900-token prompt arriving while 15 rows decode: each running row's time per
     output token and its largest gap between tokens, against the medians.
Writes serving.md and serving.json into --out (default bench/results).
``--variant-flags NAME=FLAGS`` adds a variant of our engine with those server flags, and
``--baseline-flags=FLAGS`` the ``--baseline`` engine with those (``=`` because FLAGS
starts with ``--``), e.g. ``--only distinct --variant-flags "chunk64=--prefill-chunk 64"``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gpt2onnx.bench import prepare
from gpt2onnx.bench.config import GPT2, TINY
from gpt2onnx.cli import Parser
from gpt2onnx.loadtest import DEFAULT_PROMPT, RequestResult, one_request, summarize


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Server:
    """``python -m gpt2onnx.serve FOLDER`` from ``tree`` (this checkout or a worktree)."""

    def __init__(self, folder: Path, tree: Path, flags: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2onnx.serve", str(folder), "--port", str(port),
             "--log-level", "warning", *flags], cwd=tree, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            time.sleep(0.2)
        self.close()
        raise RuntimeError("the server did not get ready in 180 s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def closed_loop(url: str, bodies: list[dict[str, Any]], concurrency: int
                      ) -> tuple[list[RequestResult], float]:
    """Each body once, at most ``concurrency`` in flight, each client sending its next as
    soon as its last ends."""
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body: dict[str, Any]) -> RequestResult:
            async with gate:
                return await one_request(client, url + "/v1/completions", body)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
        return list(results), time.perf_counter() - start


def body(prompt: str | list[int], max_tokens: int) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


def report(results: list[RequestResult], duration: float, concurrency: int) -> dict[str, Any]:
    r = summarize("", "", concurrency, None, True, results, duration)
    return {"completed": r.completed, "failed": r.failed, "output_tok_s": r.output_throughput,
            "ttft_ms": r.ttft_ms, "ttft_after_burst_ms": r.ttft_after_burst_ms,
            "tpot_ms": r.tpot_ms, "errors": r.errors}


def distinct(url: str, requests: int, new: int) -> dict[str, Any]:
    bodies = [body(f"{DEFAULT_PROMPT} #{i}", new) for i in range(requests)]
    return report(*asyncio.run(closed_loop(url, bodies, 16)), 16)


def shared_prefix(url: str, requests: int, vocab_ids: list[int], new: int, prefix: int = 200,
                  suffix: int = 16) -> dict[str, Any]:
    rng = random.Random(0)
    bodies = [body(vocab_ids[:prefix] + rng.sample(vocab_ids[prefix:], suffix), new)
              for _ in range(requests)]
    return report(*asyncio.run(closed_loop(url, bodies, 16)), 16)


async def _long_prompt(url: str, long_ids: list[int], new: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        api = url + "/v1/completions"
        running = [asyncio.create_task(one_request(client, api, body(f"{DEFAULT_PROMPT} @{i}",
                                                                     new)))
                   for i in range(15)]
        await asyncio.sleep(1.5)  # the 15 rows are decoding now
        t0 = time.perf_counter()
        long = await one_request(client, api, body(long_ids, 8))
        long_done = time.perf_counter() - t0
        rows = await asyncio.gather(*running)
    tpot = [r.tpot_s * 1e3 for r in rows if r.ok and r.tpot_s]
    worst_gap = [max(r.itl_s) / statistics.median(r.itl_s) for r in rows if r.ok and r.itl_s]
    med = statistics.median(tpot)
    return {"rows_ok": sum(r.ok for r in rows), "long_ok": long.ok,
            "long_ttft_ms": (long.ttft_s or 0) * 1e3, "long_total_ms": long_done * 1e3,
            "tpot_median_ms": med, "tpot_max_ms": max(tpot), "tpot_max_over_median":
            max(tpot) / med, "worst_gap_over_row_median": max(worst_gap),
            "errors": sorted({r.error for r in [*rows, long] if r.error})[:3]}


def long_prompt(url: str, long_ids: list[int], new: int) -> dict[str, Any]:
    return asyncio.run(_long_prompt(url, long_ids, new))


Measure = Callable[[str], dict[str, Any]]
Summary = Callable[[dict[str, Any]], str]


def interleaved(folder: Path, variants: dict[str, tuple[Path, list[str]]], runs: int,
                measure: Measure, log: Callable[[str, dict[str, Any]], None]
                ) -> dict[str, list[dict[str, Any]]]:
    """``measure(url)`` on a fresh server per variant (its source tree and flags), the
    variants' order reversed every other run."""
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(runs):
        for v in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            src, flags = variants[v]
            server = Server(folder, src, flags)
            try:
                rows[v].append(measure(server.url))
            finally:
                server.close()
            log(v, rows[v][-1])
    return rows


def worktree(ref: str) -> Path:
    tree = Path(tempfile.mkdtemp(prefix="gpt2onnx-serve-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(prepare.REPO), "worktree", "add", "--detach", str(tree),
                    ref], check=True, capture_output=True)
    return tree


def _variant(text: str) -> tuple[str, list[str]]:
    """--variant-flags NAME=FLAGS: a named variant of our engine with those server flags."""
    name, eq, flags = text.partition("=")
    if not eq or not name.strip() or not flags.split():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=FLAGS; write e.g. \"chunk64=--prefill-chunk 64\"")
    return name.strip(), flags.split()


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m gpt2onnx.bench.serving", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny model, few requests")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache", type=Path, default=prepare.REPO / "bench" / ".cache")
    p.add_argument("--baseline", default=None, help="git ref of the engine to compare with")
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--flags", default="", help="extra server flags for our engine")
    p.add_argument("--baseline-flags", default=None,
                   help="also run the --baseline engine with these server flags")
    p.add_argument("--variant-flags", action="append", default=[], type=_variant,
                   help="NAME=FLAGS: one more variant of our engine (repeatable)")
    p.add_argument("--only", default="distinct,shared,long",
                   help="workloads to run (comma-separated)")
    args = p.parse_args(argv)
    baseline_flags = None if args.baseline_flags is None else args.baseline_flags.split()
    if args.baseline_flags is not None and args.baseline is None:
        p.error(f"--baseline-flags={args.baseline_flags} needs --baseline GITREF: the engine "
                "those flags are for")
    if baseline_flags == []:
        p.error("--baseline-flags is empty; give the server flags to try on the baseline, "
                "e.g. --baseline-flags=--no-spin")
    taken = {"this engine", "separate runs"}
    for name, _ in args.variant_flags:
        if name in taken:
            p.error(f"--variant-flags name {name!r} is taken (by our default variants or an "
                    "earlier --variant-flags); pick another NAME")
        taken.add(name)
    arch = TINY if args.smoke else GPT2
    out = args.out or prepare.REPO / "bench" / "results" / ("smoke" if args.smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    runs = args.runs or (1 if args.smoke else 2)
    requests = 24 if args.smoke else 160
    new = 8 if args.smoke else 64
    ckpt, what = prepare.checkpoint(args.cache, arch)
    folder = prepare.our_export(args.cache, ckpt, "fused", "fp32")
    ours = args.flags.split()
    result: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "checkpoint": what, "load": os.getloadavg()[0],
                              "cpu_flags": prepare.cpu_flags(),
                              "requests": requests, "new_tokens": new, "flags": ours}
    tree = worktree(args.baseline) if args.baseline else None
    try:
        variants = {"this engine": (prepare.REPO, ours),
                    # The same engine without the mixed graph: chunks and decode tokens
                    # in separate model runs (what it did before model_mixed.onnx).
                    "separate runs": (prepare.REPO, [*ours, "--no-mixed-runs"])}
        for name, flags in args.variant_flags:
            variants[name] = (prepare.REPO, [*ours, *flags])
        if tree is not None:
            variants[f"engine at {args.baseline}"] = (tree, [])
            if baseline_flags:
                variants[f"engine at {args.baseline} {args.baseline_flags}"] = (
                    tree, baseline_flags)
        only = set(args.only.split(","))
        vocab = json.loads((folder / "manifest.json").read_text())["vocab_size"]
        top = min(20000, vocab)
        ids = [int(t) for t in random.Random(1).choices(range(min(300, top // 2), top), k=1000)]
        prefix_variants = {"prefix cache on": (prepare.REPO, ours),
                           "prefix cache off": (prepare.REPO, [*ours, "--prefix-cache-mb", "0"])}
        if tree is not None:
            prefix_variants[f"engine at {args.baseline}"] = (tree, [])
        shared = (200, 16) if not args.smoke else (48, 8)
        long_len = 900 if not args.smoke else 96
        workloads: list[tuple[str, dict[str, tuple[Path, list[str]]], Measure, Summary]] = [
            ("distinct", variants, lambda url: distinct(url, requests, new),
             lambda d: f"{d['output_tok_s']:.1f} tok/s, TTFT median "
                       f"{d['ttft_ms']['median']:.0f} p90 {d['ttft_ms']['p90']:.0f} ms"),
            ("shared_prefix", prefix_variants,
             lambda url: shared_prefix(url, requests, ids, max(4, new // 4), *shared),
             lambda d: f"TTFT median {d['ttft_ms']['median']:.0f} p90 "
                       f"{d['ttft_ms']['p90']:.0f} ms"),
            ("long_prompt", variants,
             lambda url: long_prompt(url, ids[:long_len], 2 * new if not args.smoke else 64),
             lambda d: f"TPOT max/median {d['tpot_max_over_median']:.2f}, worst gap / row "
                       f"median {d['worst_gap_over_row_median']:.1f}, long TTFT "
                       f"{d['long_ttft_ms']:.0f} ms"),
        ]
        for name, vs, measure, summary in workloads:
            wanted = name.split("_")[0] in only or name in only
            result[name] = interleaved(folder, vs, runs if wanted else 0, measure,
                                       lambda v, d, n=name, f=summary: _log(f"{n} / {v}: {f(d)}"))
    finally:
        if tree is not None:
            subprocess.run(["git", "-C", str(prepare.REPO), "worktree", "remove", "--force",
                            str(tree)], capture_output=True)
    (out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "serving.md").write_text(text)
    print(text)
    return 0


def _med(rows: list[dict[str, Any]], *path: str) -> float:
    values = []
    for r in rows:
        v: Any = r
        for k in path:
            v = v[k]
        values.append(v)
    return statistics.median(values)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Serving bench ({result['when']})", "",
             f"`python -m gpt2onnx.bench.serving`: real servers, the load generator on the "
             f"same cores, streaming, greedy, `ignore_eos`. Checkpoint: {result['checkpoint']}, "
             f"fused fp32. Our flags: `{' '.join(result['flags']) or '(defaults)'}`. Medians "
             f"over interleaved runs. Load average at start: {result['load']:.2f}.", ""]
    if any(result.get("distinct", {}).values()):
        lines += [f"## 16 clients, closed loop, distinct prompts, {result['new_tokens']} "
                  f"tokens, {result['requests']} requests", "",
                  "| engine | output tok/s | TTFT median | TTFT p90 | TTFT p90 after the "
                  "opening burst | TPOT median | failed |", "|---|---:|---:|---:|---:|---:|---:|"]
        for v, rows in result["distinct"].items():
            lines.append(f"| {v} | {_med(rows, 'output_tok_s'):.1f} | "
                         f"{_med(rows, 'ttft_ms', 'median'):.0f} ms | "
                         f"{_med(rows, 'ttft_ms', 'p90'):.0f} ms | "
                         f"{_med(rows, 'ttft_after_burst_ms', 'p90'):.0f} ms | "
                         f"{_med(rows, 'tpot_ms', 'median'):.1f} ms | "
                         f"{sum(r['failed'] for r in rows)} |")
        lines.append("")
    sp = result.get("shared_prefix", {})
    if any(sp.values()):
        lines += ["## 16 clients, prompts sharing a 200-token prefix (16-token suffixes)", "",
                  "| variant | TTFT median | TTFT p90 | TTFT p90 after the opening burst | "
                  "output tok/s |", "|---|---:|---:|---:|---:|"]
        for v, rows in sp.items():
            lines.append(f"| {v} | {_med(rows, 'ttft_ms', 'median'):.0f} ms | "
                         f"{_med(rows, 'ttft_ms', 'p90'):.0f} ms | "
                         f"{_med(rows, 'ttft_after_burst_ms', 'p90'):.0f} ms | "
                         f"{_med(rows, 'output_tok_s'):.1f} |")
        on, off = sp["prefix cache on"], sp["prefix cache off"]
        lines += ["", f"TTFT median with the prefix cache / without: "
                  f"{_med(on, 'ttft_ms', 'median') / _med(off, 'ttft_ms', 'median'):.2f}x.", ""]
    if any(result.get("long_prompt", {}).values()):
        lines += ["## A 900-token prompt arriving while 15 rows decode", "",
                  "| engine | running rows' TPOT median | max | max / median | worst gap / its "
                  "row's median gap | the long prompt's TTFT |", "|---|---:|---:|---:|---:|---:|"]
        for v, rows in result["long_prompt"].items():
            lines.append(f"| {v} | {_med(rows, 'tpot_median_ms'):.1f} ms | "
                         f"{_med(rows, 'tpot_max_ms'):.1f} ms | "
                         f"{_med(rows, 'tpot_max_over_median'):.2f} | "
                         f"{_med(rows, 'worst_gap_over_row_median'):.1f} | "
                         f"{_med(rows, 'long_ttft_ms'):.0f} ms |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
