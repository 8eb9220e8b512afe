"""Results -> the targets of issues 4 and 5 (met or not, with the numbers) and Markdown."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gpt2onnx.bench.variants import INT4_COARSE_BLOCK

FUSED = ("ours-fused-fp32", "ours-fused-int8", "ours-fused-int4")
QUANT_FLOOR = {"ours-fused-int8": "int8", "ours-fused-int4": "int4"}


@dataclass
class Target:
    issue: int
    what: str
    value: float | None
    limit: float
    op: str  # "<=" or ">="
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compute_targets(r: dict[str, Any]) -> list[Target]:
    dec, pos, bat, cold = r["decode"], r["positions"], r["batch"], r["cold"]
    floor = r["floor"]

    def ms(name: str) -> float | None:
        return dec[name]["ms_per_token"] if name in dec else None

    def fl(precision: str) -> float | None:
        return floor[precision]["gemv_ms"] if precision in floor else None

    t: list[Target] = []
    f32 = ms("ours-fused-fp32")
    t.append(Target(5, "fused fp32 ms/token / optimum's", _ratio(f32, ms("optimum")), 0.4, "<="))
    t.append(Target(5, "fused fp32 ms/token / PyTorch cached", _ratio(f32, ms("torch-cached")),
                    0.4, "<="))
    t.append(Target(5, "fused fp32 ms/token / its weight-streaming floor",
                    _ratio(f32, fl("fp32")), 1.3, "<="))
    for name, precision in QUANT_FLOOR.items():
        t.append(Target(5, f"fused {precision} ms/token / PyTorch cached",
                        _ratio(ms(name), ms("torch-cached")), 0.12, "<="))
        t.append(Target(5, f"fused {precision} ms/token / its weight-streaming floor",
                        _ratio(ms(name), fl(precision)), 1.5, "<="))
    uncached = pos.get("torch-uncached", {})
    growth = (f" (uncached PyTorch: x{_ratio(uncached[max(uncached, key=int)], uncached[min(uncached, key=int)]):.1f})"  # noqa: E501
              if uncached else "")
    for name in FUSED:
        if pos.get(name):
            first, last = min(pos[name], key=int), max(pos[name], key=int)
            t.append(Target(5, f"{name} latency at position {last} / at {first}",
                            _ratio(pos[name][last], pos[name][first]), 1.3, "<=",
                            growth))
    for name in FUSED:
        if name in bat and "16" in bat[name]:
            t.append(Target(5, f"{name} tokens/s at batch 16 / batch 1",
                            _ratio(bat[name]["16"], bat[name]["1"]), 8.0, ">="))
    opt_cold = cold.get("optimum", {}).get("first_token_s")
    for name in FUSED:
        if name in cold:
            t.append(Target(5, f"{name} cold start to first token / optimum's",
                            _ratio(cold[name]["first_token_s"], opt_cold), 0.25, "<="))
    for name, v in r["variants"].items():
        if name in cold and v["kind"] == "ours":
            budget = v["folder_mb"] + v["kv_cache_mb"] + 200
            t.append(Target(5, f"{name} peak RSS (MB) vs folder + KV cache + 200 MB",
                            cold[name]["peak_rss_mb"], budget, "<=",
                            f"folder {v['folder_mb']:.0f} MB + KV {v['kv_cache_mb']:.0f} MB"))
    layouts = r.get("layouts") or {}
    if layouts:
        worst = max(layouts, key=lambda p: layouts[p]["ratio_median"])
        t.append(Target(4, "fused fp32 / standard fp32 step latency, paired median at the "
                        "worst position (<= 1.05: at least as fast, within noise)",
                        layouts[worst]["ratio_median"], 1.05, "<=", f"position {worst}"))
        late = [p for p in layouts if int(p) > 256]
        if late:
            # "Clearly faster" = faster by more than the pair-to-pair noise, consistently:
            # the worst position's median ratio at most 0.95, and fused faster in at least
            # 90 % of all pairs past 256 tokens (sign test p < 0.001 at 7 pairs x 4).
            worst = max(late, key=lambda p: layouts[p]["ratio_median"])
            t.append(Target(4, "fused fp32 / standard fp32 step latency past 256 tokens, "
                            "paired median at the worst position (clearly faster)",
                            layouts[worst]["ratio_median"], 0.95, "<=", f"position {worst}"))
            won = sum(layouts[p]["fused_faster_pairs"] for p in late)
            pairs = sum(layouts[p]["pairs"] for p in late)
            t.append(Target(4, "share of pairs past 256 tokens where fused fp32 was faster",
                            won / pairs, 0.9, ">=", f"{won}/{pairs} pairs"))
    for name in QUANT_FLOOR:
        t.append(Target(4, f"fused fp32 ms/token / {name} ms/token (batch 1)",
                        _ratio(f32, ms(name)), 3.0, ">="))
    t += peer_targets(r)
    return t


# The engines issue 17 holds us against (onnxruntime-genai, CTranslate2, OpenVINO GenAI,
# llama.cpp): every kind that is neither ours nor PyTorch/transformers/optimum.
NOT_PEERS = ("ours", "torch-uncached", "torch-cached", "hf-generate", "optimum")


def peer_targets(r: dict[str, Any]) -> list[Target]:
    """Issue 17, at each precision: ours against the best peer of that precision."""
    dec, bat, cold = r["decode"], r["batch"], r["cold"]
    smp, long = r.get("decode_sampled") or {}, r.get("prefill_long") or {}
    t: list[Target] = []
    pairs = [(p, f"ours-fused-{p}", "") for p in ("fp32", "int8", "int4")]
    # int4 at block 128 too, OpenVINO's own group size (variants.INT4_COARSE_BLOCK).
    pairs.append(("int4", f"ours-fused-int4-b{INT4_COARSE_BLOCK}",
                  f" (ours at block {INT4_COARSE_BLOCK})"))
    # ``which`` follows the precision: "int4 (ours at block 128) batch-16 tokens/s ...".
    for precision, ours, which in pairs:
        peers = [n for n, v in r["variants"].items()
                 if v["kind"] not in NOT_PEERS and v.get("precision") == precision]
        if ours not in r["variants"] or not peers:
            continue

        def best(table: dict[str, Any], key: str, lowest: bool = True,
                 names: list[str] = peers) -> tuple[str | None, float | None]:
            got = [(table[n][key], n) for n in names if n in table and key in table[n]]
            if not got:
                return None, None
            v, n = min(got) if lowest else max(got)
            return n, v

        for table, what in ((dec, "greedy"), (smp, "sampled")):
            name, v = best(table, "ms_per_token")
            mine = table.get(ours, {}).get("ms_per_token")
            if name and mine:
                t.append(Target(17, f"{precision}{which} batch-1 {what} tokens/s, ours / the "
                                "best peer's", v / mine, 1.15, ">=", name))
        b16 = {n: {"tps": v["16"]} for n, v in bat.items() if "16" in v}
        name, v = best(b16, "tps", lowest=False)
        if name and ours in b16:
            t.append(Target(17, f"{precision}{which} batch-16 tokens/s, ours / the best peer's",
                            b16[ours]["tps"] / v, 1.0, ">=", name))
        name, v = best(long, "prefill_ms")
        if name and ours in long:
            t.append(Target(17, f"{precision}{which} prefill time, ours / the best peer's",
                            long[ours]["prefill_ms"] / v, 1.0, "<=", name))
        name, v = best(cold, "first_token_s")
        if name and ours in cold:
            t.append(Target(17, f"{precision}{which} cold start to first token, ours / "
                            "the best peer's", cold[ours]["first_token_s"] / v, 1.0, "<=", name))
        name, v = best(cold, "peak_rss_mb")
        if name and ours in cold:
            t.append(Target(17, f"{precision}{which} peak RSS, ours / the best peer's",
                            cold[ours]["peak_rss_mb"] / v, 1.1, "<=", name))
    return t


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(r: dict[str, Any], targets: list[Target]) -> str:
    m = r["meta"]
    names = list(r["variants"])
    dec, pos, bat, cold = r["decode"], r["positions"], r["batch"], r["cold"]
    ref = dec.get("torch-cached", {}).get("ms_per_token")
    out = [
        f"# gpt2onnx bench ({r['config']['name']})",
        "",
        f"{m['model']}; {m['cpu']} ({', '.join(m.get('cpu_flags') or ['flags unknown'])}), "
        f"{m['physical_cores']} physical / {m['logical_cores']} "
        f"logical cores, {m['memory_gb']:.0f} GB; onnxruntime {m['onnxruntime']}, torch "
        f"{m['torch']}, transformers {m['transformers']}"
        + (f", optimum {m['optimum']} (transformers {m['optimum_transformers']})"
           if m.get("optimum") else "")
        + f"; {m['started']}, {m['duration_s'] / 60:.0f} min, load average "
        f"{m['load_before']:.1f} before / {m['load_after']:.1f} after.",
        "",
        f"Batch 1, {r['config']['prompt_tokens']}-token prompt, {r['config']['new_tokens']} new "
        f"tokens, greedy; medians of {r['config']['runs']} interleaved runs after a warm-up "
        f"(uncached: {r['config']['uncached_runs']}); best run = the fastest run's median, "
        "the least disturbed by other processes. Floor: a GEMV over the same weights in "
        "onnxruntime, measured in this run.",
        "",
        "| variant | prefill ms | ms/token (median) | p90 | best run | tokens/s "
        "| x PyTorch cached | floor ms | x floor | tokens = PyTorch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    agree = r.get("agree_with_torch", {})
    n_new = r["config"]["new_tokens"]
    for n in names:
        if n not in dec:
            continue
        d = dec[n]
        floor = r["floor"].get(r["variants"][n]["precision"]) if n.startswith("ours") else None
        fms = floor["gemv_ms"] if floor else None
        out.append(
            f"| {r['variants'][n]['label']} | {_f(d['prefill_ms'])} | "
            f"{_f(d['ms_per_token'], '{:.2f}')} | {_f(d['ms_per_token_p90'], '{:.2f}')} | "
            f"{_f(min(d['ms_per_token_runs']), '{:.2f}')} | {_f(d['tokens_per_s'])} | "
            f"{_f(_ratio(d['ms_per_token'], ref), '{:.3f}')} | "
            f"{_f(fms, '{:.2f}')} | {_f(_ratio(d['ms_per_token'], fms), '{:.2f}')} | "
            f"{agree.get(n, '-')}/{n_new} |")
    sampled, long = r.get("decode_sampled") or {}, r.get("prefill_long") or {}
    if sampled or long:
        sp = r.get("sampling", {})
        n_long = next(iter(long.values()), {}).get("tokens", "-")
        out += ["", f"Batch-1 decode sampled (temperature {sp.get('temperature')}, top-p "
                f"{sp.get('top_p')}, seeded; engines that sample) against greedy, and the "
                f"prefill of a {n_long}-token prompt to its first token:", "",
                "| variant | greedy ms/token | sampled ms/token | sampled / greedy "
                f"| prefill {n_long} ms | prefill tokens/s |", "|---|---:|---:|---:|---:|---:|"]
        for n in names:
            if n not in sampled and n not in long:
                continue
            g = dec.get(n, {}).get("ms_per_token")
            smp = sampled.get(n, {}).get("ms_per_token")
            lp = long.get(n, {})
            out.append(f"| {r['variants'][n]['label']} | {_f(g, '{:.2f}')} | "
                       f"{_f(smp, '{:.2f}')} | {_f(_ratio(smp, g), '{:.2f}')} | "
                       f"{_f(lp.get('prefill_ms'), '{:.1f}')} | "
                       f"{_f(lp.get('tokens_per_s'), '{:.0f}')} |")
    if pos:
        cols = sorted({int(p) for v in pos.values() for p in v})
        out += ["", "Per-token latency (ms) by context position (tokens already in context; "
                "uncached = one forward over the whole text):", "",
                "| variant | " + " | ".join(str(c) for c in cols) + " |",
                "|---|" + "---:|" * len(cols)]
        for n in names:
            if n in pos:
                out.append(f"| {r['variants'][n]['label']} | "
                           + " | ".join(_f(pos[n].get(str(c))) for c in cols) + " |")
    layouts = r.get("layouts") or {}
    if layouts:
        cfg = r["config"]
        out += ["", f"Fused against standard fp32, paired (issue 4): at each context position, "
                f"{cfg['layout_runs']} pairs of back-to-back runs (prefill to the position, "
                f"then {cfg['layout_window']} timed decode steps each), order alternating; "
                "medians, and the spread of the per-pair ratio:", "",
                "| position | standard ms | fused ms | fused / standard (median) "
                "| min - max | fused faster in |",
                "|---:|---:|---:|---:|---|---:|"]
        for p, v in layouts.items():
            out.append(f"| {p} | {v['standard_ms']:.2f} | {v['fused_ms']:.2f} | "
                       f"{v['ratio_median']:.3f} | {v['ratio_min']:.2f} - {v['ratio_max']:.2f} "
                       f"| {v['fused_faster_pairs']}/{v['pairs']} |")
    if bat:
        bs = sorted({int(b) for v in bat.values() for b in v})
        out += ["", f"Decode tokens/s (all rows) by batch size ({r['config']['batch_new_tokens']}"
                " new tokens per row):", "",
                "| variant | " + " | ".join(f"batch {b}" for b in bs) + " |",
                "|---|" + "---:|" * len(bs)]
        for n in names:
            if n in bat:
                out.append(f"| {r['variants'][n]['label']} | "
                           + " | ".join(_f(bat[n].get(str(b)), "{:.0f}") for b in bs) + " |")
    out += ["", "Cold start (fresh process: start to first token), peak RSS, model on disk:", "",
            "| variant | first token s | peak RSS MB | folder MB | KV cache MB |",
            "|---|---:|---:|---:|---:|"]
    for n in names:
        v = r["variants"][n]
        c = cold.get(n, {})
        out.append(f"| {v['label']} | {_f(c.get('first_token_s'), '{:.2f}')} | "
                   f"{_f(c.get('peak_rss_mb'), '{:.0f}')} | {_f(v.get('folder_mb'), '{:.0f}')} | "
                   f"{_f(v.get('kv_cache_mb'), '{:.0f}')} |")
    out += ["", "Weight-streaming floor (GEMV over every weight matrix, batch 1):", "",
            "| precision | weight bytes / token | GEMV ms | GB/s |", "|---|---:|---:|---:|"]
    for p, f in r["floor"].items():
        out.append(f"| {p} | {f['weight_bytes'] / 1e6:.1f} MB | {f['gemv_ms']:.2f} | "
                   f"{f['gb_per_s']:.1f} |")
    out += ["", "Targets:", "", "| issue | target | value | limit | met |",
            "|---|---|---:|---:|---|"]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "n/a"}[t.met]
        out.append(f"| {t.issue} | {t.what}{' ' + t.detail if t.detail else ''} | "
                   f"{_f(t.value, '{:.3f}')} | {t.op} {t.limit:g} | {met} |")
    if r.get("kvmem"):
        out += ["", "KV cache memory, 2 x layers x batch x heads x head_dim x seq x bytes "
                "(`python -m gpt2onnx.kvmem`):", "", r["kvmem"]]
    if r.get("notes"):
        out += ["", *[f"- {n}" for n in r["notes"]]]
    return "\n".join(out) + "\n"
