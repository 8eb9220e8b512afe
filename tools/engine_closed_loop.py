"""The serving engine in a closed loop, in process (no HTTP, no load generator):
``--clients`` coroutines on ``Engine.stream``, each sending its next request as soon as
the last one ends, ``--tokens`` new tokens each (EOS held off), and every model run
timed. Prints one JSON line: output tokens/s, TTFT and TPOT medians, the wall time and
the time in model runs, the runs and their deciles.

It separates the engine from HTTP: docs/serving.md's "Spinning" numbers (this engine
against the one at 734424b, spinning and sleeping) are from it. ``--tree`` runs the
engine of another checkout (a ``git worktree`` of an older commit) on the same folder:

    git worktree add --detach /tmp/old 734424b
    python tools/engine_closed_loop.py FOLDER --tree /tmp/old --spin 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

SPIN = {"1": True, "0": False, "run": "run"}


class _Parser(argparse.ArgumentParser):
    """One line and exit 2 on a bad argument (gpt2onnx.cli.Parser's rule; that module
    cannot be imported before --tree picks the gpt2onnx to run)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (try --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a fused model folder")
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                   help="the checkout whose gpt2onnx runs (default: this one)")
    p.add_argument("--spin", choices=tuple(SPIN), default="1",
                   help="intra-op spinning: 1, 0 or run (default 1, the server's)")
    p.add_argument("--no-mixed-runs", action="store_true",
                   help="separate runs for chunks and decode tokens")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="EngineConfig.prefill_chunk (default: the engine's own)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--sampled", action="store_true",
                   help="temperature 0.8, top-p 0.95, a seed per request (default: greedy)")
    args = p.parse_args(argv)
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        p.error(f"--prefill-chunk must be at least 1, got {args.prefill_chunk}")
    for name in ("clients", "requests", "tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not (args.folder / "manifest.json").is_file():
        p.error(f"{args.folder} is not a model folder (no manifest.json); export one first")
    return args


async def closed_loop(engine: Any, params: Any, args: argparse.Namespace
                      ) -> tuple[float, list[float], list[float]]:
    todo = list(range(args.requests))
    ttft: list[float] = []
    tpot: list[float] = []

    async def client() -> None:
        while todo:
            i = todo.pop(0)
            p = replace(params, seed=i) if args.sampled else params
            request = engine.request(f"The quick brown fox jumps over the lazy dog #{i}",
                                     p, n=1)
            t0 = time.perf_counter()
            first = None
            async with engine.stream(request) as stream:
                async for deltas in stream:
                    if first is None and any(d.text or d.finish_reason for d in deltas):
                        first = time.perf_counter()
            assert first is not None
            ttft.append(first - t0)
            if args.tokens > 1:
                tpot.append((time.perf_counter() - first) / (args.tokens - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    return time.perf_counter() - t0, ttft, tpot


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(args.tree.resolve()))
    import onnxruntime as ort

    runs: list[float] = []
    plain = ort.InferenceSession.run_with_iobinding

    def timed(self: Any, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return plain(self, *a, **k)
        finally:
            runs.append(time.perf_counter() - t0)

    ort.InferenceSession.run_with_iobinding = timed  # type: ignore[method-assign]
    import gpt2onnx
    from gpt2onnx.loadtest import _stats  # the HTTP load generator's percentiles
    from gpt2onnx.runtime import GenerationParams, Model
    from gpt2onnx.serve import Engine, EngineConfig

    if not Path(gpt2onnx.__file__).resolve().is_relative_to(args.tree.resolve()):
        raise SystemExit(f"gpt2onnx came from {gpt2onnx.__file__}, not --tree {args.tree}")
    kwargs: dict[str, Any] = {"spinning": SPIN[args.spin]}
    if "mixed" in Model.__init__.__code__.co_varnames:  # engines before the mixed graph
        kwargs["mixed"] = not args.no_mixed_runs
    params = GenerationParams(max_new_tokens=args.tokens, min_tokens=args.tokens,
                              **({"temperature": 0.8, "top_p": 0.95} if args.sampled else {}))
    chunk = {} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}
    with Engine(lambda: Model(args.folder, **kwargs),
                EngineConfig(max_batch_size=args.clients, **chunk)) as engine:
        runs.clear()  # not the warm-up's
        wall, ttft, tpot = asyncio.run(closed_loop(engine, params, args))
    d = sorted(runs)
    first = _stats(ttft)
    print(json.dumps({
        "tree": str(args.tree), "spin": args.spin, "mixed": kwargs.get("mixed"),
        "sampled": args.sampled,
        "output_tok_s": round(args.requests * args.tokens / wall, 1),
        "ttft_ms_median": round(first["median"], 1),
        "ttft_ms_p90": round(first["p90"], 1),
        "tpot_ms_median": round(1e3 * statistics.median(tpot), 1) if tpot else None,
        "wall_s": round(wall, 4), "run_s_total": round(sum(d), 4),
        "model_runs": len(d), "run_ms_median": round(1e3 * statistics.median(d), 1),
        "run_ms_deciles": [round(1e3 * d[min(len(d) - 1, int(len(d) * q))], 1)
                           for q in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
