"""The parent's side: worker processes, the interleaved schedule, cold starts, statistics.

Interleaving: every measurement loops ``for run: for variant:`` (rotating which variant
goes first), so a burst of load from other processes lands on all variants alike, and
each reported number is a median across runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2onnx.bench.config import BenchConfig
from gpt2onnx.bench.prepare import REPO
from gpt2onnx.bench.variants import KIND_TORCH_UNCACHED, Variant

Log = Callable[[str], None]


def worker_env() -> dict[str, str]:
    # The optimum venv does not have gpt2onnx installed: it imports the worker from here.
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep + path if path else ''}",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Target:
    """Where a variant runs: its worker's interpreter and the folder its engine loads."""

    variant: Variant
    python: str
    folder: str

    def spec(self) -> str:
        return json.dumps({"kind": self.variant.kind, "folder": self.folder,
                           "provider": self.variant.provider})


class Worker:
    """A variant's engine in its own process, driven by JSON lines."""

    def __init__(self, target: Target, log_dir: Path) -> None:
        self.target = target
        self.stderr = open(log_dir / f"{target.variant.name}.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [target.python, "-m", "gpt2onnx.bench.worker", target.spec()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=worker_env(), cwd=REPO)
        hello = self._read()
        self.load_s: float = hello["load_s"]
        self.info: dict[str, Any] = hello["info"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.target.variant.name} died; see "
                               f"{self.stderr.name}")
        return json.loads(line)

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"{self.target.variant.name}: {out['error']}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError, OSError):  # already gone
                self.call(op="quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Decode runs -> prefill median, per-token median (median of per-run medians), p90
    over all steps, tokens/s."""
    per_run = [statistics.median(r["step_ms"]) for r in runs]
    steps = [s for r in runs for s in r["step_ms"]]
    median = statistics.median(per_run)
    return {
        "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
        "ms_per_token": median,
        "ms_per_token_p90": float(np.percentile(steps, 90)),
        "ms_per_token_runs": per_run,
        "tokens_per_s": 1e3 / median,
    }


def _rotate(items: list[Any], k: int) -> list[Any]:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def measure_decode(workers: dict[str, Worker], prompt: list[int], cfg: BenchConfig,
                   log: Log, sampled: bool = False) -> dict[str, Any]:
    """Batch-1 prefill and per-token decode latency, interleaved, after one warm-up each.
    ``sampled``: the engines that sample do so with ``config.SAMPLING`` (the others are
    left out), ``cfg.sampled_runs`` times."""
    if sampled:
        workers = {n: w for n, w in workers.items() if w.info.get("samples")}
    how = {"sampled": True} if sampled else {}
    for name, w in workers.items():
        log(f"  warm-up {name}")
        w.call(op="decode", prompt=prompt, new_tokens=min(8, cfg.new_tokens), batch=1, **how)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
    n_runs = cfg.sampled_runs if sampled else cfg.runs
    for r in range(n_runs):
        for name in _rotate(list(workers), r):
            if (workers[name].target.variant.kind == KIND_TORCH_UNCACHED
                    and r >= cfg.uncached_runs):
                continue
            out = workers[name].call(op="decode", prompt=prompt, new_tokens=cfg.new_tokens,
                                     batch=1, **how)
            out["load_average"] = os.getloadavg()[0]  # how busy the machine was meanwhile
            runs[name].append(out)
            log(f"  run {r + 1}/{n_runs} {name}{' sampled' if sampled else ''}: "
                f"{statistics.median(out['step_ms']):.2f} ms/token")
    result = {}
    for name, rs in runs.items():
        result[name] = {**summarize(rs), "runs": rs}
    return result


def measure_prefill(workers: dict[str, Worker], prompt: list[int], cfg: BenchConfig,
                    log: Log) -> dict[str, dict[str, Any]]:
    """Prefill of a ``cfg.prefill_tokens``-token prompt (to its first token), batch 1,
    interleaved; the medians of ``cfg.prefill_runs``."""
    names = [n for n, w in workers.items() if w.target.variant.kind != KIND_TORCH_UNCACHED]
    text = (prompt * (cfg.prefill_tokens // len(prompt) + 1))[:cfg.prefill_tokens]
    got: dict[str, list[float]] = {n: [] for n in names}
    for r in range(cfg.prefill_runs):
        for name in _rotate(names, r):
            out = workers[name].call(op="decode", prompt=text, new_tokens=2, batch=1)
            got[name].append(out["prefill_ms"])
            log(f"  prefill {len(text)} tokens {name}: {out['prefill_ms']:.1f} ms")
    return {n: {"prefill_ms": statistics.median(v), "tokens": len(text),
                "tokens_per_s": len(text) * 1e3 / statistics.median(v), "runs": v}
            for n, v in got.items() if v}


def measure_positions(workers: dict[str, Worker], prompt: list[int], cfg: BenchConfig,
                      log: Log) -> dict[str, dict[str, float]]:
    """Per-token latency at each context position (medians across passes)."""
    positions = [p for p in cfg.positions if p >= len(prompt)]
    passes: dict[str, list[dict[str, float]]] = {name: [] for name in workers}
    for r in range(cfg.position_runs):
        for name in _rotate(list(workers), r):
            t0 = time.perf_counter()
            out = workers[name].call(op="positions", prompt=prompt, positions=positions,
                                     window=cfg.position_window)
            passes[name].append(out["position_ms"])
            log(f"  positions pass {r + 1} {name}: {time.perf_counter() - t0:.0f} s")
    return {name: {str(p): statistics.median(ps[str(p)] for ps in pp) for p in positions}
            for name, pp in passes.items()}


LAYOUT_PAIR = ("ours-fused-fp32", "ours-standard-fp32")
PAIR_SETTLE_S = 0.1


def measure_layouts(workers: dict[str, Worker], prompt: list[int], cfg: BenchConfig,
                    log: Log) -> dict[str, Any]:
    """Fused against standard fp32 at each context position, as paired ratios.

    The long decode of ``measure_positions`` puts minutes between the two layouts' steps at
    one position; on a shared machine that noise (+-30 %) hides a 15 % difference. Here
    each pair is two short runs back to back (prefill to the position, then time a window
    of steps), order alternating, so the ratio of a pair sees one machine state; the
    median over pairs is what the issue-4 targets read.
    """
    fused, standard = LAYOUT_PAIR
    if fused not in workers or standard not in workers:
        return {}
    ratios: dict[int, list[float]] = {p: [] for p in cfg.layout_positions}
    step: dict[str, dict[int, list[float]]] = {
        n: {p: [] for p in cfg.layout_positions} for n in LAYOUT_PAIR}
    for r in range(cfg.layout_runs):
        for i, p in enumerate(cfg.layout_positions):
            got = {}
            for name in _rotate(list(LAYOUT_PAIR), r + i):
                # onnxruntime's threads spin on for a while after a run: let the other
                # worker's threads go idle before this one is timed (see floor.py).
                time.sleep(PAIR_SETTLE_S)
                got[name] = workers[name].call(op="step_ms", prompt=prompt, position=p,
                                               window=cfg.layout_window)["step_ms"]
                step[name][p].append(got[name])
            ratios[p].append(got[fused] / got[standard])
        log(f"  layout pairs {r + 1}/{cfg.layout_runs}: fused/standard " + ", ".join(
            f"{p}: {ratios[p][-1]:.2f}" for p in cfg.layout_positions))
    return {str(p): {
        "fused_ms": statistics.median(step[fused][p]),
        "standard_ms": statistics.median(step[standard][p]),
        "ratio_median": statistics.median(ratios[p]),
        "ratio_min": min(ratios[p]), "ratio_max": max(ratios[p]),
        "fused_faster_pairs": sum(x < 1 for x in ratios[p]), "pairs": len(ratios[p]),
    } for p in cfg.layout_positions}


def measure_batches(workers: dict[str, Worker], prompt: list[int], cfg: BenchConfig,
                    log: Log) -> dict[str, dict[str, Any]]:
    """Decode tokens/s (all rows) at each batch size; medians across passes."""
    names = [n for n, w in workers.items() if w.target.variant.kind != KIND_TORCH_UNCACHED]
    got: dict[str, dict[int, list[float]]] = {n: {b: [] for b in cfg.batches} for n in names}
    for r in range(cfg.batch_runs):
        for b in cfg.batches:
            for name in _rotate(names, r + b):
                out = workers[name].call(op="decode", prompt=prompt,
                                         new_tokens=cfg.batch_new_tokens, batch=b)
                got[name][b].append(b * 1e3 / statistics.median(out["step_ms"]))
            log(f"  batch {b} pass {r + 1}: " + ", ".join(
                f"{n} {got[n][b][-1]:.0f}" for n in names) + " tokens/s")
    return {n: {str(b): statistics.median(v) for b, v in per.items()} for n, per in got.items()}


def cold_start(target: Target, prompt: list[int], new_tokens: int, log_dir: Path
               ) -> dict[str, float]:
    """A fresh process: seconds from its start to its first token, and its peak RSS."""
    with open(log_dir / f"{target.variant.name}.cold.log", "a") as err:
        t0 = time.time()
        proc = subprocess.run(
            [target.python, "-m", "gpt2onnx.bench.worker", target.spec(), "--cold", repr(t0),
             json.dumps(prompt), str(new_tokens)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=worker_env(), cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cold start of {target.variant.name} failed; see {err.name}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_cold(targets: list[Target], prompt: list[int], cfg: BenchConfig, log_dir: Path,
                 log: Log) -> dict[str, dict[str, Any]]:
    got: dict[str, list[dict[str, float]]] = {t.variant.name: [] for t in targets}
    for r in range(cfg.cold_runs):
        for t in _rotate(targets, r):
            if t.variant.kind == KIND_TORCH_UNCACHED:
                continue  # the same process as torch-cached up to the first token
            out = cold_start(t, prompt, cfg.cold_new_tokens, log_dir)
            got[t.variant.name].append(out)
            log(f"  cold {t.variant.name}: first token {out['first_token_s']:.2f} s, "
                f"peak RSS {out['peak_rss_mb']:.0f} MB")
    return {name: {"first_token_s": statistics.median(o["first_token_s"] for o in outs),
                   "peak_rss_mb": max(o["peak_rss_mb"] for o in outs), "runs": outs}
            for name, outs in got.items() if outs}


def start_workers(targets: list[Target], log_dir: Path, log: Log) -> dict[str, Worker]:
    workers: dict[str, Worker] = {}
    try:
        for t in targets:
            log(f"  loading {t.variant.name}")
            workers[t.variant.name] = Worker(t, log_dir)
    except BaseException:
        for w in workers.values():
            w.close()
        raise
    return workers


def tokens_agree(decode: dict[str, Any], reference: str) -> dict[str, int]:
    """How many leading greedy tokens (first timed run) each variant shares with the
    reference: equal work is being timed, and the graphs compute the same model. (After a
    first difference the texts diverge, so only the shared prefix means anything.)"""
    if reference not in decode:
        return {}
    ref = decode[reference]["runs"][0]["tokens"]
    out = {}
    for name, d in decode.items():
        toks = d["runs"][0]["tokens"]
        n = 0
        while n < min(len(ref), len(toks)) and ref[n] == toks[n]:
            n += 1
        out[name] = n
    return out

