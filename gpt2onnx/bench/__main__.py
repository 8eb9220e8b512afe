"""python -m gpt2onnx.bench [--smoke] [--out DIR] [--skip-optimum] [--variants NAME ...]

Writes latest.md (also printed), latest.json (raw numbers + machine info), the PNG plots
and a timestamped raw-*.json into --out. ``make bench-setup`` builds the optimum venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from gpt2onnx.bench import measurements as ms
from gpt2onnx.bench import prepare
from gpt2onnx.bench.config import FULL, PEERS, SAMPLING, SMOKE, BenchConfig
from gpt2onnx.bench.peer_llamacpp import KV_TYPE as LLAMACPP_KV_TYPE
from gpt2onnx.bench.report import compute_targets, markdown
from gpt2onnx.bench.variants import (
    ALL_VARIANTS,
    CUDA_VARIANTS,
    GENAI_VENV,
    KIND_CT2,
    KIND_GENAI,
    KIND_LLAMACPP,
    KIND_OPENVINO,
    KIND_OPTIMUM,
    KIND_OURS,
    TORCH_KINDS,
    Variant,
)
from gpt2onnx.cli import Parser, int_in, run_main
from gpt2onnx.kvmem import kv_cache_bytes
from gpt2onnx.kvmem import table as kv_table

# A fixed prompt of real text, tokenized by the GPT-2 tokenizer in every variant's stead.
PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm "
               "afternoon sun by the old river bank.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [v.name for v in (*ALL_VARIANTS, *CUDA_VARIANTS)]
    p = Parser(prog="python -m gpt2onnx.bench", description=__doc__.split(
        "\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, few tokens, no optimum: the CI mode (under a minute)")
    p.add_argument("--peers", action="store_true",
                   help="the peers preset (every engine, fewer positions and passes) into "
                        "bench/results/peers")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default bench/results, bench/results/smoke with "
                        "--smoke)")
    p.add_argument("--cache", type=Path, default=prepare.REPO / "bench" / ".cache",
                   help="checkpoints and exports, reused between runs")
    p.add_argument("--skip-optimum", action="store_true",
                   help="leave out optimum (needs .venv-optimum: `make bench-setup`)")
    p.add_argument("--variants", nargs="+", choices=names, default=None, metavar="NAME",
                   help=f"variants to run (default: all available): {', '.join(names)}")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a GPT-2 checkpoint folder instead of gpt2 / random gpt2 weights")
    p.add_argument("--runs", type=int_in(1, 10_000), default=None,
                   help="timed decode runs per variant")
    p.add_argument("--no-cuda", action="store_true", help="skip CUDA variants even if present")
    return p.parse_args(argv)


class Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _ver(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_flags": prepare.cpu_flags(),
        "cpu_short": cpu.split(" ")[0] + " " + " ".join(cpu.split(" ")[1:2]),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "memory_gb": psutil.virtual_memory().total / 2**30,
        "platform": platform.platform(), "python": platform.python_version(),
        "onnxruntime": _ver("onnxruntime") or _ver("onnxruntime-gpu"),
        "torch": _ver("torch"), "transformers": _ver("transformers"), "numpy": _ver("numpy"),
    }


def select_variants(args: argparse.Namespace, notes: list[str]) -> list[Variant]:
    import onnxruntime as ort

    chosen = list(ALL_VARIANTS)
    if "CUDAExecutionProvider" in ort.get_available_providers() and not args.no_cuda:
        chosen += CUDA_VARIANTS
    else:
        notes.append("CUDA variants not run: no CUDAExecutionProvider in this onnxruntime.")
    if args.variants:
        chosen = [v for v in (*ALL_VARIANTS, *CUDA_VARIANTS) if v.name in args.variants]
    if args.smoke:
        chosen = [v for v in chosen if v.venv is None]
    if args.skip_optimum:
        chosen = [v for v in chosen if v.kind != KIND_OPTIMUM]
    for venv in sorted({v.venv for v in chosen if v.venv}):
        if prepare.peer_python(venv) is None:
            names = ", ".join(v.name for v in chosen if v.venv == venv)
            notes.append(f"{names} not run: {venv} is missing (`make bench-setup`).")
            chosen = [v for v in chosen if v.venv != venv]
    return chosen


def build_targets(chosen: list[Variant], ckpt: Path, cache: Path, clock: Clock
                  ) -> list[ms.Target]:
    targets = []
    for v in chosen:
        if v.kind == KIND_OURS:
            assert v.layout is not None
            clock.log(f"export {v.name}")
            folder = prepare.our_export(cache, ckpt, v.layout, v.precision, v.provider,
                                        v.int4_block_size)
            targets.append(ms.Target(v, sys.executable, str(folder)))
        elif v.kind in TORCH_KINDS:
            targets.append(ms.Target(v, sys.executable, str(ckpt)))
        elif v.kind == KIND_OPTIMUM:
            python = prepare.optimum_python()
            assert python is not None
            clock.log("optimum export")
            folder = prepare.optimum_export(cache, ckpt, python)
            targets.append(ms.Target(v, str(python), str(folder)))
        elif v.kind == KIND_GENAI:
            python = prepare.peer_python(GENAI_VENV)
            assert python is not None
            clock.log("onnxruntime-genai: our standard fp32 folder")
            folder = prepare.genai_folder(cache, ckpt)
            targets.append(ms.Target(v, str(python), str(folder)))
        elif v.kind == KIND_LLAMACPP:
            from gpt2onnx.bench.peer_llamacpp import gguf_files

            clock.log(f"llama.cpp GGUF for {v.name}")
            # gen_ids does the work; its worker needs only the stdlib: this interpreter.
            folder = gguf_files(cache, ckpt)[v.precision]
            targets.append(ms.Target(v, sys.executable, str(folder)))
        elif v.kind in (KIND_CT2, KIND_OPENVINO):
            # Converted in the peer's own venv (its converter's transformers, not ours).
            assert v.venv is not None
            python = prepare.peer_python(v.venv)
            assert python is not None
            clock.log(f"{v.name}: convert the checkpoint")
            if v.kind == KIND_CT2:
                from gpt2onnx.bench.peer_ct2 import ct2_folder

                folder = ct2_folder(cache, ckpt, v.precision, python)
            else:
                from gpt2onnx.bench.peer_openvino import openvino_folder

                folder = openvino_folder(cache, ckpt, v.precision, python)
            targets.append(ms.Target(v, str(python), str(folder)))
    return targets


def peer_cache_bytes(kind: str, precision: str) -> int | None:
    """Bytes per cached K or V element as each engine runs here (None: the engine picks
    it at load, per host). llama.cpp: the ``--kv`` type gen_ids is given (f32 for the
    f32 GGUF, its default f16 for the quantized ones); OpenVINO: f32 forced for fp32,
    the plugin's own choice otherwise (u8 on the AVX-512 host of 2026-12-02, recorded
    in each run's engine info); CTranslate2 keeps its cache in float32 at fp32 and int8
    compute on the CPU; the rest (PyTorch, optimum, onnxruntime-genai on our standard
    fp32 folder) float32."""
    if kind == KIND_LLAMACPP:
        return {"f32": 4, "f16": 2}[LLAMACPP_KV_TYPE[precision]]
    if kind == KIND_OPENVINO:
        return 4 if precision == "fp32" else None
    return 4


def variant_facts(t: ms.Target, cfg: BenchConfig, arch: dict[str, int]) -> dict[str, Any]:
    """Label, folder size and the KV cache a batch-1 generation holds."""
    v = t.variant
    folder = Path(t.folder)
    n_head, n_layer = arch["n_head"], arch["n_layer"]
    head_dim = arch["n_embd"] // n_head
    seq = cfg.prompt_tokens + cfg.cold_new_tokens
    cache_bytes: int | None = peer_cache_bytes(v.kind, v.precision)
    if v.kind == KIND_OURS:
        manifest = json.loads((folder / "manifest.json").read_text())
        cache_bytes = 2 if manifest["cache_dtype"] == "float16" else 4
        if manifest["layout"] == "fused":
            seq = manifest["max_length"]  # preallocated at max_length
    size = prepare.folder_mb(folder, "*.safetensors" if v.kind in TORCH_KINDS else "*")
    kv = (None if cache_bytes is None
          else kv_cache_bytes(n_layer, n_head, head_dim, 1, seq, cache_bytes) / 1e6)
    return {**v.to_dict(), "folder": str(folder), "folder_mb": size, "kv_cache_mb": kv}


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = SMOKE if args.smoke else PEERS if args.peers else FULL
    if args.runs:
        cfg = cfg.with_(runs=args.runs, uncached_runs=min(cfg.uncached_runs, args.runs))
    out: Path = args.out or prepare.REPO / "bench" / "results" / (
        "smoke" if args.smoke else "peers" if args.peers else "")
    out.mkdir(parents=True, exist_ok=True)
    cache: Path = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    log_dir = cache / "logs"
    log_dir.mkdir(exist_ok=True)
    clock = Clock()
    notes: list[str] = []
    meta = machine_info()
    meta["load_before"] = os.getloadavg()[0]
    meta["started"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    if args.checkpoint:
        ckpt, what = args.checkpoint, f"checkpoint {args.checkpoint}"
        arch = {k: v for k, v in json.loads((ckpt / "config.json").read_text()).items()
                if k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
    else:
        clock.log("checkpoint")
        arch = cfg.arch
        ckpt, what = prepare.checkpoint(cache, arch)
    n_params = _n_params(arch)
    meta["model"] = f"GPT-2 architecture ({n_params / 1e6:.0f}M parameters), {what}"
    meta["model_short"] = f"GPT-2 {n_params / 1e6:.0f}M"

    chosen = select_variants(args, notes)
    targets = build_targets(chosen, ckpt, cache, clock)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    prompt = tok.encode(PROMPT_TEXT, add_special_tokens=False).ids[:cfg.prompt_tokens]

    # The floor: over the weights of the fused fp32 graph, for each precision we run.
    fp32_folder = prepare.our_export(cache, ckpt, "fused", "fp32")
    precisions = sorted({t.variant.precision for t in targets if t.variant.kind == KIND_OURS
                         and t.variant.provider == "cpu"} | {"fp32"})
    clock.log(f"floor: GEMV over the weights in {', '.join(precisions)}")
    from gpt2onnx.bench.floor import measure_floors

    floors = measure_floors(fp32_folder / "model.onnx", precisions, cfg.floor_runs)
    for f in floors.values():
        clock.log(f"  floor {f.precision}: {f.weight_bytes / 1e6:.0f} MB in {f.gemv_ms:.2f} ms "
                  f"({f.gb_per_s:.1f} GB/s)")

    clock.log("starting workers")
    workers = ms.start_workers(targets, log_dir, clock.log)
    try:
        clock.log("decode latency, batch 1")
        decode = ms.measure_decode(workers, prompt, cfg, clock.log)
        sampled: dict[str, Any] = {}
        if cfg.sampled_runs:
            clock.log(f"decode latency, batch 1, sampled {SAMPLING}")
            sampled = ms.measure_decode(workers, prompt, cfg, clock.log, sampled=True)
        prefill: dict[str, Any] = {}
        if cfg.prefill_tokens:
            clock.log(f"prefill of a {cfg.prefill_tokens}-token prompt")
            prefill = ms.measure_prefill(workers, prompt, cfg, clock.log)
        clock.log("latency by context position")
        positions = ms.measure_positions(workers, prompt, cfg, clock.log)
        clock.log("fused vs standard fp32, paired by context position")
        layouts = ms.measure_layouts(workers, prompt, cfg, clock.log)
        clock.log("throughput by batch size")
        batch = ms.measure_batches(workers, prompt, cfg, clock.log)
        infos = {name: {"load_s": w.load_s, **w.info} for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    clock.log("cold starts (fresh processes)")
    cold = ms.measure_cold(targets, prompt, cfg, log_dir, clock.log)

    opt = infos.get("optimum", {})
    meta.update(optimum=opt.get("optimum"), optimum_onnx=opt.get("optimum_onnx"),
                optimum_transformers=opt.get("transformers"),
                load_after=os.getloadavg()[0], duration_s=clock_elapsed(clock))
    dims = {k: arch[k] for k in ("n_layer", "n_head", "n_embd")}
    results: dict[str, Any] = {
        "meta": meta, "config": asdict(cfg), "prompt_ids": prompt,
        "variants": {t.variant.name: {**variant_facts(t, cfg, arch),
                                      "worker": infos.get(t.variant.name, {})}
                     for t in targets},
        "decode": decode, "agree_with_torch": ms.tokens_agree(decode, "torch-cached"),
        "decode_sampled": sampled, "sampling": SAMPLING, "prefill_long": prefill,
        "positions": positions, "layouts": layouts, "batch": batch, "cold": cold,
        "floor": {p: f.to_dict() for p, f in floors.items()},
        "kvmem": kv_table(["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"], [1, 4, 16, 32],
                          [128, 1024], ["fp32", "fp16"]),
        "arch": dims, "notes": notes,
    }
    targets_met = compute_targets(results)
    results["targets"] = [t.to_dict() for t in targets_met]
    write(results, markdown(results, targets_met), out, clock)
    return results


def _n_params(arch: dict[str, int]) -> int:
    d, n_layer = arch["n_embd"], arch["n_layer"]
    per_layer = 12 * d * d + 13 * d  # attn qkv + proj, mlp 4d in/out, 2 LayerNorms, biases
    return n_layer * per_layer + (arch["vocab_size"] + arch["n_positions"]) * d + 2 * d


def clock_elapsed(clock: Clock) -> float:
    return time.perf_counter() - clock.t0


def write(results: dict[str, Any], md: str, out: Path, clock: Clock) -> None:
    from gpt2onnx.bench.plots import write_plots

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = json.dumps(results, indent=1)
    (out / "latest.json").write_text(text + "\n")
    (out / f"raw-{stamp}.json").write_text(text + "\n")
    (out / "latest.md").write_text(md)
    write_plots(results, out)
    clock.log(f"wrote {out}/latest.md, latest.json, raw-{stamp}.json and the plots")
    print(md)


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
