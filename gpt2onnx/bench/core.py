"""python -m gpt2onnx.bench.core [--smoke] [--out DIR] [--baseline GITREF]

The one-step core's numbers (issue 12), in one run on the gpt2 architecture:
  1. sampled (temperature 0.8, top-p 0.95) against greedy ms/token, batch 1 and 16,
     fused fp32 and int8, interleaved run by run;
  2. batch-1 greedy decode against the code before the change (``--baseline``, a git ref
     checked out into a temporary worktree that runs its own export of the same
     checkpoint), paired: the two processes alternate run by run;
  3. scoring a 20,000-token text (window 1,024, stride 512) against transformers' loop
     from its perplexity guide: tokens/s and perplexity.
Writes core.md and core.json into --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpt2onnx.bench import prepare
from gpt2onnx.bench.config import GPT2, TINY

# A worker process: reads one JSON command per line, answers one JSON line. It uses only
# the API both the old and the new code have (Model, GenerationParams, generator).
WORKER = r"""
import json, statistics, sys, time
from gpt2onnx.runtime import GenerationParams, Model
model = Model(sys.argv[1])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    params = GenerationParams(max_new_tokens=cmd["new"], stop_on_eos=False, **cmd["params"])
    gen = model.generator([cmd["prompt"]] * cmd["batch"], params)
    gen.generate_next_token()
    steps = []
    while not gen.is_done():
        t0 = time.perf_counter()
        gen.generate_next_token()
        steps.append((time.perf_counter() - t0) * 1e3)
    del gen
    print(json.dumps({"ms": statistics.median(steps)}), flush=True)
"""

SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 0}
TEMPERATURE = {"temperature": 0.8, "seed": 0}  # the sampler's cheapest path, for reference
GREEDY: dict[str, Any] = {}
KINDS = {"greedy": GREEDY, "sampled": SAMPLED, "temperature": TEMPERATURE}


class Worker:
    def __init__(self, folder: Path, pythonpath: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(folder)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self._line())["ready"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("bench worker died")
        return line

    def run(self, prompt: list[int], new: int, batch: int, params: dict[str, Any]) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new": new, "batch": batch,
                                          "params": params}) + "\n")
        self.proc.stdin.flush()
        return float(json.loads(self._line())["ms"])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sampled_vs_greedy(folders: dict[str, Path], prompt: list[int], new: int, runs: int,
                      batches: list[int]) -> list[dict[str, Any]]:
    out = []
    for precision, folder in folders.items():
        w = Worker(folder, prepare.REPO)
        try:
            for batch in batches:
                for params in KINDS.values():  # warm-up: arena and bindings
                    w.run(prompt, 4, batch, params)
                ms: dict[str, list[float]] = {kind: [] for kind in KINDS}
                for r in range(runs):
                    order = list(KINDS)[r % 3:] + list(KINDS)[:r % 3]  # rotate the order
                    for kind in order:
                        ms[kind].append(w.run(prompt, new, batch, KINDS[kind]))
                g, s, t = (statistics.median(ms[k]) for k in KINDS)
                out.append({"precision": precision, "batch": batch, "greedy_ms": g,
                            "sampled_ms": s, "ratio": s / g, "temperature_ms": t,
                            "temperature_ratio": t / g, "runs": ms})
                _log(f"{precision} batch {batch}: greedy {g:.2f} sampled {s:.2f} "
                     f"({s / g:.3f}x) temperature-only {t:.2f} ({t / g:.3f}x) ms/step")
        finally:
            w.close()
    return out


def against_baseline(ckpt: Path, cache: Path, ref: str, folders: dict[str, Path],
                     prompt: list[int], new: int, runs: int) -> list[dict[str, Any]]:
    """The old code, in a worktree at ``ref`` with its own export, paired run by run."""
    tree = Path(tempfile.mkdtemp(prefix="gpt2onnx-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(prepare.REPO), "worktree", "add", "--detach", str(tree),
                    ref], check=True, capture_output=True)
    out = []
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        for precision, folder in folders.items():
            old_folder = cache / f"baseline-{ref}-{ckpt.name}-{precision}"
            if not (old_folder / "manifest.json").exists():
                subprocess.run([sys.executable, "-m", "gpt2onnx.export", str(ckpt),
                                str(old_folder), "--precision", precision, "--no-validate"],
                               env=env, check=True, capture_output=True, cwd=tree)
            old, cur = Worker(old_folder, tree), Worker(folder, prepare.REPO)
            try:
                for w in (old, cur):
                    w.run(prompt, 4, 1, GREEDY)
                pairs: dict[str, list[float]] = {"before": [], "after": []}
                sampled: dict[str, list[float]] = {"before": [], "after": []}
                for r in range(runs):
                    members = [("before", old), ("after", cur)]
                    for name, w in members if r % 2 == 0 else members[::-1]:
                        pairs[name].append(w.run(prompt, new, 1, GREEDY))
                        sampled[name].append(w.run(prompt, new, 1, SAMPLED))
                ratio = statistics.median(a / b for a, b in zip(pairs["after"],
                                                                pairs["before"], strict=True))
                row = {"precision": precision, "ref": ref,
                       "before_ms": statistics.median(pairs["before"]),
                       "after_ms": statistics.median(pairs["after"]),
                       "paired_ratio": ratio,
                       "before_sampled_ms": statistics.median(sampled["before"]),
                       "after_sampled_ms": statistics.median(sampled["after"]),
                       "runs": pairs, "sampled_runs": sampled}
                out.append(row)
                _log(f"{precision} batch 1 greedy: before {row['before_ms']:.2f} after "
                     f"{row['after_ms']:.2f} ms/token (paired after/before {ratio:.3f}); "
                     f"sampled before {row['before_sampled_ms']:.2f} after "
                     f"{row['after_sampled_ms']:.2f}")
            finally:
                old.close()
                cur.close()
    finally:
        subprocess.run(["git", "-C", str(prepare.REPO), "worktree", "remove", "--force",
                        str(tree)], capture_output=True)
    return out


def scoring(ckpt: Path, folder: Path, n_tokens: int, window: int, stride: int
            ) -> dict[str, Any]:
    import torch
    from transformers import GPT2LMHeadModel

    from gpt2onnx.runtime import Model

    model = Model(folder)
    base = model.encode(Path(prepare.REPO / "README.md").read_text())
    ids = (base * (n_tokens // len(base) + 1))[:n_tokens]
    model.score(ids[:window], window=window, stride=stride)  # warm-up
    t0 = time.perf_counter()
    ours = model.score(ids, window=window, stride=stride)
    ours_s = time.perf_counter() - t0
    del model
    hf = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    seq = torch.tensor([ids])
    nll_sum, counted, prev_end = 0.0, 0, 0
    t0 = time.perf_counter()
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target).loss
        valid = int((target[:, 1:] != -100).sum())  # labels are shifted by one
        nll_sum += float(loss) * valid
        counted += valid
        prev_end = end
        if end == len(ids):
            break
    hf_s = time.perf_counter() - t0
    hf_ppl = math.exp(nll_sum / counted)
    row = {"tokens": n_tokens, "window": window, "stride": stride,
           "ours_s": ours_s, "ours_tok_s": ours.scored / ours_s, "ours_perplexity": ours.perplexity,
           "transformers_s": hf_s, "transformers_tok_s": counted / hf_s,
           "transformers_perplexity": hf_ppl,
           "speedup": (ours.scored / ours_s) / (counted / hf_s),
           "perplexity_rel_diff": abs(ours.perplexity - hf_ppl) / hf_ppl,
           "torch_threads": torch.get_num_threads()}
    _log(f"scoring {n_tokens} tokens: ours {row['ours_tok_s']:.0f} tok/s, transformers "
         f"{row['transformers_tok_s']:.0f} tok/s ({row['speedup']:.2f}x); perplexity "
         f"{ours.perplexity:.6g} vs {hf_ppl:.6g}")
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# One-step core bench ({result['when']})", "",
             f"Checkpoint: {result['checkpoint']}. Load average at start: {result['load']}.", "",
             "## Sampled (temperature 0.8, top-p 0.95) against greedy, median ms per step", "",
             "| precision | batch | greedy | sampled | sampled / greedy | temperature 0.8 "
             "alone | / greedy |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["sampling"]:
        lines.append(f"| fused {r['precision']} | {r['batch']} | {r['greedy_ms']:.2f} | "
                     f"{r['sampled_ms']:.2f} | {r['ratio']:.3f} | {r['temperature_ms']:.2f} | "
                     f"{r['temperature_ratio']:.3f} |")
    if result.get("baseline"):
        ref = result["baseline"][0]["ref"]
        lines += ["", f"## Batch 1 against the code before the change ({ref})",
                  "", "| precision | greedy before | greedy after | paired after / before | "
                  "sampled before | sampled after |", "|---|---:|---:|---:|---:|---:|"]
        for r in result["baseline"]:
            lines.append(f"| fused {r['precision']} | {r['before_ms']:.2f} | {r['after_ms']:.2f} "
                         f"| {r['paired_ratio']:.3f} | {r['before_sampled_ms']:.2f} | "
                         f"{r['after_sampled_ms']:.2f} |")
    s = result.get("scoring")
    if s:
        lines += ["", f"## Scoring {s['tokens']} tokens (window {s['window']}, stride "
                  f"{s['stride']})", "", "| engine | tokens/s | perplexity |", "|---|---:|---:|",
                  f"| gpt2onnx fused fp32 | {s['ours_tok_s']:.0f} | {s['ours_perplexity']:.6g} |",
                  f"| transformers ({s['torch_threads']} threads) | {s['transformers_tok_s']:.0f} "
                  f"| {s['transformers_perplexity']:.6g} |", "",
                  f"Speed-up {s['speedup']:.2f}x; perplexity relative difference "
                  f"{s['perplexity_rel_diff']:.2g}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2onnx.bench.core", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny model, a few tokens")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache", type=Path, default=prepare.REPO / "bench" / ".cache")
    p.add_argument("--baseline", default=None, help="git ref of the code to compare with")
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--skip-scoring", action="store_true")
    args = p.parse_args(argv)
    arch = TINY if args.smoke else GPT2
    out = args.out or prepare.REPO / "bench" / "results" / ("smoke" if args.smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    ckpt, what = prepare.checkpoint(args.cache, arch)
    folders = {precision: prepare.our_export(args.cache, ckpt, "fused", precision)
               for precision in ("fp32", "int8")}
    prompt = list(range(464, 472))  # 8 tokens
    runs = args.runs or (2 if args.smoke else 7)
    new = 8 if args.smoke else 64
    result: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "checkpoint": what, "load": os.getloadavg()[0],
                              "cpu_flags": prepare.cpu_flags()}
    result["sampling"] = sampled_vs_greedy(folders, prompt, new, runs, [1, 16])
    if args.baseline:
        result["baseline"] = against_baseline(ckpt, args.cache, args.baseline, folders, prompt,
                                              new, runs)
    if not args.skip_scoring:
        n, window, stride = (600, 128, 64) if args.smoke else (20_000, 1024, 512)
        result["scoring"] = scoring(ckpt, folders["fp32"], n, window, stride)
    (out / "core.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "core.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
