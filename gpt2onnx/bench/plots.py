"""PNG plots of a results dict: latency vs position, tokens/s vs batch, ms/token vs floor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("latency_vs_position.png", "tokens_per_s_vs_batch.png", "ms_per_token_vs_floor.png",
         "engines_by_measure.png")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _header(r: dict[str, Any]) -> str:
    m = r["meta"]
    return f"{m['model_short']}, {m['physical_cores']}-core {m['cpu_short']}"


def _color(r: dict[str, Any], name: str) -> str:
    """One colour per variant across every plot."""
    return f"C{list(r['variants']).index(name) % 10}"


def _save_line_plot(plt: Any, fig: Any, ax: Any, path: Path) -> None:
    """Grid, legend outside the axes on the right, then write the PNG."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_vs_position(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, curve in r["positions"].items():
        xs = sorted(int(p) for p in curve)
        style = "--" if name == "torch-uncached" else "-"
        ax.plot(xs, [curve[str(x)] for x in xs], style, marker="o", ms=3,
                color=_color(r, name), label=r["variants"][name]["label"])
    ax.set_yscale("log")
    ax.set_xlabel("context position (tokens already in context)")
    ax.set_ylabel("ms per token (log)")
    ax.set_title(f"Per-token latency as the context grows, batch 1 ({_header(r)})")
    _save_line_plot(plt, fig, ax, path)


def tokens_vs_batch(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, per in r["batch"].items():
        bs = sorted(int(b) for b in per)
        ax.plot(bs, [per[str(b)] for b in bs], marker="o", color=_color(r, name),
                label=r["variants"][name]["label"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s, all rows (log)")
    ax.set_title(f"Throughput vs batch size ({_header(r)})")
    _save_line_plot(plt, fig, ax, path)


def ms_vs_floor(r: dict[str, Any], path: Path) -> None:
    plt = _plt()
    names = [n for n in r["decode"] if n != "torch-uncached"]
    measured = [r["decode"][n]["ms_per_token"] for n in names]
    floors = [r["floor"].get(r["variants"][n]["precision"], {}).get("gemv_ms")
              if n.startswith("ours") else None for n in names]
    fig, ax = plt.subplots(figsize=(9, 5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], measured, width=0.4, label="measured ms/token (median)")
    ax.bar([x + 0.2 for x in xs], [f or 0 for f in floors], width=0.4,
           label="weight-streaming floor (GEMV)")
    for x, v, f in zip(xs, measured, floors, strict=True):
        ax.text(x - 0.2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        if f:
            ax.text(x + 0.2, f, f"x{v / f:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r["variants"][n]["label"] for n in names], rotation=25,
                  ha="right", fontsize=7)
    ax.set_yscale("log")  # PyTorch and the quantized graphs differ by 100x
    ax.set_ylabel("ms per token, batch 1 (log)")
    ax.set_title(f"Decode latency against the weight-streaming floor ({_header(r)})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def engines_by_measure(r: dict[str, Any], path: Path) -> None:
    """One panel per measure (batch-1 greedy and sampled, batch 16, long prefill, cold
    start, peak RSS), a bar per variant, ours and the peers alike."""
    plt = _plt()
    panels = [
        ("batch 1 greedy, tokens/s", {n: 1e3 / d["ms_per_token"]
                                      for n, d in r["decode"].items()}),
        ("batch 1 sampled, tokens/s", {n: 1e3 / d["ms_per_token"]
                                       for n, d in (r.get("decode_sampled") or {}).items()}),
        ("batch 16, tokens/s", {n: v["16"] for n, v in r["batch"].items() if "16" in v}),
        ("prefill (long prompt), ms", {n: d["prefill_ms"]
                                       for n, d in (r.get("prefill_long") or {}).items()}),
        ("cold start to first token, s", {n: d["first_token_s"] for n, d in r["cold"].items()}),
        ("peak RSS, MB", {n: d["peak_rss_mb"] for n, d in r["cold"].items()}),
    ]
    names = [n for n in r["variants"] if n != "torch-uncached"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharey=True)
    for ax, (title, values) in zip(axes.flat, panels, strict=True):
        ys = range(len(names))
        ax.barh(list(ys), [values.get(n, 0) for n in names],
                color=[_color(r, n) for n in names])
        for y, n in zip(ys, names, strict=True):
            if n in values:
                ax.text(values[n], y, f" {values[n]:.3g}", va="center", fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].set_yticks(list(range(len(names))), [r["variants"][n]["label"] for n in names],
                          fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"Every engine, every measure ({_header(r)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(r: dict[str, Any], out: Path) -> list[Path]:
    paths = [out / p for p in PLOTS]
    latency_vs_position(r, paths[0])
    tokens_vs_batch(r, paths[1])
    ms_vs_floor(r, paths[2])
    engines_by_measure(r, paths[3])
    return paths
