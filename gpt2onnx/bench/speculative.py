"""python -m gpt2onnx.bench.speculative [--smoke] [--out DIR] [--runs N]

Speculative decoding (issue 13), every variant interleaved run by run, medians:
  1. gpt2 architecture (random weights), fused fp32 target, batch 1, greedy: plain decoding
     against prompt lookup (k = 4, 8), draft models of the same checkpoint (int8, int4;
     k = 4, 8) and a draft that never agrees (another random checkpoint, half the layers):
     ms/token, speed-up, identical tokens, acceptance, tokens per verification;
  1b. an int8 target (per-row activation scales) with prompt lookup and an int4 draft;
  2. the same fp32 target sampling at temperature 1 (free text, nothing to copy): what prompt
     lookup costs when it cannot help;
  3. the embedded trained model (pydoc-tiny): its real acceptance rates on doc prose and
     on a prompt that quotes a passage of its training text and starts it again;
  4. batch 1, 2 and 4 with prompt lookup on every row: where speculation stops paying
     (each speculating row verifies in a run of its own on the CPU).
Writes speculative.md and speculative.json into --out (default bench/results).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from gpt2onnx.bench import prepare
from gpt2onnx.bench.config import GPT2, TINY
from gpt2onnx.runtime import GenerationParams, Model

EMBEDDED = prepare.REPO / "models" / "pydoc-tiny"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(model: Model, prompts: list[list[int]], params: GenerationParams,
          draft: object, k: int) -> dict[str, Any]:
    """One generation: ms per token of its decode (after the first token), the tokens,
    and the speculation counters."""
    gen = model.generator(prompts, params, draft=draft, num_draft_tokens=k,
                          speculative_max_batch=len(prompts))
    try:
        gen.generate_next_token()  # prefill + first token
        t0 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        elapsed = time.perf_counter() - t0
        new = max(len(r.token_ids) for r in gen.rows if r is not None) - 1
        return {"ms_per_token": elapsed * 1e3 / max(new, 1),
                "tokens": [list(r.token_ids) for r in gen.rows if r is not None],
                **gen.speculation.to_dict()}
    finally:
        gen.close()


def compare(name: str, model: Model, prompts: list[list[int]], params: GenerationParams,
            variants: dict[str, tuple], runs: int) -> dict[str, Any]:
    """Every variant (draft, k[, the target Model to use]) against plain decoding with
    ``model``, interleaved, medians of ``runs``."""
    all_variants: dict[str, tuple] = {"plain": (None, 4), **variants}

    def target(v: tuple) -> Model:
        return v[2] if len(v) > 2 else model

    for v in all_variants.values():  # warm-up: arenas, bindings, draft caches
        timed(target(v), prompts, params.with_(max_new_tokens=8), v[0], v[1])
    ms: dict[str, list[float]] = {v: [] for v in all_variants}
    last: dict[str, dict[str, Any]] = {}
    for r in range(runs):
        order = list(all_variants)
        order = order[r % len(order):] + order[:r % len(order)]
        for v in order:
            spec = all_variants[v]
            last[v] = timed(target(spec), prompts, params, spec[0], spec[1])
            ms[v].append(last[v]["ms_per_token"])
    plain = statistics.median(ms["plain"])
    rows = []
    for v in all_variants:
        m = statistics.median(ms[v])
        res = last[v]
        rows.append({"variant": v, "ms_per_token": m, "speedup": plain / m,
                     "identical": res["tokens"] == last["plain"]["tokens"],
                     "acceptance_rate": res["acceptance_rate"],
                     "tokens_per_round": res["tokens_per_round"], "runs": ms[v],
                     "tokens": res["tokens"][0]})
        _log(f"{name} / {v}: {m:.2f} ms/token, {plain / m:.2f}x, acceptance "
             f"{res['acceptance_rate']:.2f}, {res['tokens_per_round']:.2f} tokens/round")
    return {"workload": name, "batch": len(prompts), "rows": rows,
            "greedy": params.temperature == 0.0}


OPENVINO_VENV = ".venv-openvino"


def openvino_side(cache: Path, ckpt: Path, prompt: list[int], new: int, ks: tuple[int, ...],
                  runs: int, ours: dict[str, Any]) -> dict[str, Any] | None:
    """OpenVINO GenAI's plain, prompt-lookup and draft-model (int8 of the same checkpoint)
    decoding on the same ids, right after ours in the same run (its venv: ``make
    bench-openvino-setup``); None where that venv is missing."""
    from gpt2onnx.bench import openvino_speculative as ovs

    python = prepare.peer_python(OPENVINO_VENV)
    if python is None:
        _log(f"OpenVINO GenAI not run: {OPENVINO_VENV} is missing (make bench-openvino-setup)")
        return None
    target = ovs.export_ir(python, ckpt, cache / f"openvino-{ckpt.name}-fp32", "fp32")
    draft = ovs.export_ir(python, ckpt, cache / f"openvino-{ckpt.name}-int8", "int8")
    _log("OpenVINO GenAI: plain, prompt lookup, int8 draft")
    out = ovs.run(python, target, draft, prompt, new, list(ks), runs)
    ours_plain = next(r for r in ours["rows"] if r["variant"] == "plain")
    ours_tokens = ours_plain.get("tokens")
    plain = out["modes"]["plain"]["ms_per_token"]
    ours_ms = {r["variant"]: r["ms_per_token"] for r in ours["rows"]}
    rows = []
    for mode, m in out["modes"].items():
        rows.append({"variant": mode, "ms_per_token": m["ms_per_token"],
                     "speedup": plain / m["ms_per_token"],
                     "identical_to_ours": m["tokens"] == ours_tokens,
                     "ours_ms_per_token": ours_ms.get(mode),
                     "runs": m["runs"]})
        _log(f"OpenVINO {mode}: {m['ms_per_token']:.2f} ms/token")
    return {"openvino_genai": out["openvino_genai"], "rows": rows}


def copy_prompt(model: Model) -> list[int]:
    """A passage of the embedded model's training text (CPython's own docstrings), then
    its first words again: the continuation that copies it is what prompt lookup finds."""
    passage = inspect.getdoc(json.dumps) or ""
    passage = passage[:400]
    return model.encode(passage + "\n\n" + " ".join(passage.split()[:6]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2onnx.bench.speculative",
                                description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny model, few tokens")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache", type=Path, default=prepare.REPO / "bench" / ".cache")
    p.add_argument("--runs", type=int, default=None)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore", RuntimeWarning)
    arch = TINY if args.smoke else GPT2
    out = args.out or prepare.REPO / "bench" / "results" / ("smoke" if args.smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    runs = args.runs or (1 if args.smoke else 5)
    new = 12 if args.smoke else 64
    ckpt, what = prepare.checkpoint(args.cache, arch)
    target = Model(prepare.our_export(args.cache, ckpt, "fused", "fp32"))
    # With a draft model the target and the draft spin only within their runs, as the CLI
    # and the server load them (folder.session_options): plain decoding keeps the default.
    paired = Model(target.folder, spinning="run")
    drafts = {p: Model(prepare.our_export(args.cache, ckpt, "fused", p), spinning="run")
              for p in ("int8", "int4")}
    result: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "checkpoint": what, "load": os.getloadavg()[0],
                              "cpu_flags": prepare.cpu_flags(),
                              "new_tokens": new, "workloads": []}
    prompt = [list(range(464, 472))]
    greedy = GenerationParams(max_new_tokens=new, stop_on_eos=False)
    ks = (4, 8)
    variants = {f"prompt lookup k={k}": ("ngram", k) for k in ks}
    for precision, model in drafts.items():
        variants.update({f"{precision} draft k={k}": (model, k, paired) for k in ks})
    # A draft that never agrees (another random checkpoint): what adaptation leaves of the
    # cost of drafting for nothing.
    other, _ = prepare.checkpoint(args.cache, {**arch, "n_layer": max(1, arch["n_layer"] // 2)},
                                  seed=1)
    unrelated = Model(prepare.our_export(args.cache, other, "fused", "int8"), spinning="run")
    variants["unrelated int8 draft k=8"] = (unrelated, 8, paired)
    work = result["workloads"]
    work.append(compare("gpt2 arch, greedy", target, prompt, greedy, variants, runs))
    if not args.smoke:
        result["openvino"] = openvino_side(args.cache, ckpt, prompt[0], new, ks, runs,
                                           work[-1])
    # An int8 target: each token row has its own activation scale, so its verification is
    # exact (up to the attention kernel's rounding) and "identical tokens" is checked too.
    work.append(compare("gpt2 arch, int8 target, greedy", Model(drafts["int8"].folder),
                        prompt, greedy, {"prompt lookup k=4": ("ngram", 4),
                                         "prompt lookup k=8": ("ngram", 8),
                                         "int4 draft k=4": (drafts["int4"], 4, drafts["int8"])},
                        runs))
    free = greedy.with_(temperature=1.0, seed=0)
    work.append(compare("gpt2 arch, sampled T=1 (nothing to copy)", target, prompt, free,
                        {"prompt lookup k=4": ("ngram", 4)}, runs))
    if (EMBEDDED / "config.json").exists():
        tiny = Model(prepare.our_export(args.cache, EMBEDDED, "fused", "fp32"))
        tiny_run = Model(tiny.folder, spinning="run")
        tiny8 = Model(prepare.our_export(args.cache, EMBEDDED, "fused", "int8"), spinning="run")
        doc = [tiny.encode('def read(self, path):\n    """Return the')]
        tiny_variants = {"prompt lookup k=4": ("ngram", 4), "prompt lookup k=8": ("ngram", 8),
                         "int8 draft k=4": (tiny8, 4, tiny_run)}
        long = greedy.with_(max_new_tokens=2 * new)
        work.append(compare("pydoc-tiny, greedy doc prose", tiny, doc, long, tiny_variants,
                            runs))
        quote = copy_prompt(tiny)
        work.append(compare("pydoc-tiny, greedy, quoting its training text", tiny, [quote],
                            long.with_(max_new_tokens=min(2 * new, tiny.context_length
                                                          - len(quote))),
                            tiny_variants, runs))
    for batch in (1, 2, 4):
        prompts = [list(range(464 + i, 472 + i)) for i in range(batch)]
        work.append(compare(f"gpt2 arch, greedy, batch {batch}", target, prompts, greedy,
                            {"prompt lookup k=4": ("ngram", 4)}, runs))
    (out / "speculative.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "speculative.md").write_text(text)
    print(text)
    return 0


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Speculative decoding bench ({result['when']})", "",
             f"Target checkpoint: {result['checkpoint']}; fused fp32 target unless the "
             "workload says int8, "
             f"{result['new_tokens']} new tokens per run (128 for pydoc-tiny), medians of "
             f"interleaved runs. Load average at start: {result['load']:.2f}; CPU flags: "
             f"{', '.join(result.get('cpu_flags') or ['unknown'])}.", ""]
    for w in result["workloads"]:
        lines += [f"## {w['workload']}", "",
                  "| variant | ms/token | speed-up | identical tokens | acceptance | "
                  "tokens per verification |", "|---|---:|---:|---|---:|---:|"]
        for r in w["rows"]:
            same = ("yes" if r["identical"] else "NO") if w["greedy"] else "n/a (sampled)"
            spec = r["variant"] != "plain"
            lines.append(f"| {r['variant']} | {r['ms_per_token']:.2f} | {r['speedup']:.2f}x | "
                         f"{same if spec else ''} | "
                         f"{r['acceptance_rate']:.2f} | {r['tokens_per_round']:.2f} |"
                         if spec else f"| plain | {r['ms_per_token']:.2f} | 1.00x | | | |")
        lines.append("")
    ov = result.get("openvino")
    if ov:
        lines += [f"## OpenVINO GenAI {ov['openvino_genai']}, the gpt2 greedy workload above", "",
                  "Its own modes on its own export (optimum-cli, fp32 target, int8 draft of "
                  "the same checkpoint), the same prompt ids, right after ours in the same "
                  "run; ms per token after the first (its prefill timed alone and left out, "
                  "as for ours).", "",
                  "| mode | OpenVINO ms/token | its speed-up | ours ms/token | ours / OpenVINO "
                  "| tokens = ours |", "|---|---:|---:|---:|---:|---|"]
        for r in ov["rows"]:
            mine = r["ours_ms_per_token"]
            theirs = r["ms_per_token"]
            ratio = "-" if mine is None else f"{mine / theirs:.2f}x"
            lines.append(f"| {r['variant']} | {theirs:.2f} | {r['speedup']:.2f}x | "
                         f"{'-' if mine is None else f'{mine:.2f}'} | {ratio} | "
                         f"{'yes' if r['identical_to_ours'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
