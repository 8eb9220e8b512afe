"""Held-out perplexity and top-1 agreement of the embedded model, per exported precision.

    python tools/evaluate_precisions.py [--model models/pydoc-tiny] [--blocks 48]
    (make model-card)
    python tools/evaluate_precisions.py --int4-block-size 16 32 64 128 256
    (int4 at each block size, printed only: the card keeps the default export's numbers)

The held-out split is rebuilt exactly as training made it (same stdlib docs, same hash
split, same tokenizer, 256-token blocks). PyTorch scores it in fp32; each precision is
exported (fused layout, validated) and scored through *our runtime*: every block is fed
token by token through the KV cache, and the log-probability of the true next token is
read from the logits each step (teacher forcing). Top-1 agreement is the fraction of
positions whose argmax equals PyTorch fp32's. Results go to eval.json in the model folder
and into the model card's "Exported precisions" section.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CARD_START = "<!-- exported-precisions:begin -->"
CARD_END = "<!-- exported-precisions:end -->"
PRECISIONS = ("fp32", "fp16", "int8", "int4")


def heldout_blocks(model_dir: Path, n_blocks: int) -> np.ndarray:
    """[n_blocks, block] held-out token ids, as the training script packs them."""
    from tokenizers import Tokenizer
    from train_tiny_model import collect_stdlib_docs, pack

    config = json.loads((model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    corpus = collect_stdlib_docs()
    ids = [e.ids for e in tok.encode_batch([t for _, t in corpus.heldout])]
    blocks = pack(ids, config["eos_token_id"], config["n_positions"]).numpy()
    return blocks[:n_blocks]


def torch_scores(model_dir: Path, blocks: np.ndarray) -> tuple[float, np.ndarray]:
    """(perplexity, argmax [blocks, block - 1]) of the PyTorch fp32 model."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).float().eval()
    nll, argmax = [], []
    with torch.no_grad():
        for row in blocks:
            logits = model(torch.tensor(row[None])).logits[0, :-1].float()  # [block-1, vocab]
            logp = torch.log_softmax(logits, -1)
            nll.append(-logp[torch.arange(len(row) - 1), torch.tensor(row[1:])].numpy())
            argmax.append(logits.argmax(-1).numpy())
    return float(np.exp(np.concatenate(nll).mean())), np.stack(argmax)


def runtime_scores(
    folder: Path, blocks: np.ndarray, batch: int = 16
) -> tuple[float, np.ndarray, float]:
    """(perplexity, argmax [blocks, block - 1], ms per step) through the runtime's cache."""
    from gpt2onnx.runtime import Model
    from gpt2onnx.runtime.cache import Append
    from gpt2onnx.runtime.sampling import log_softmax

    model = Model(folder)
    nll, argmax, step_ms = [], [], []
    for start in range(0, len(blocks), batch):
        rows = blocks[start : start + batch]
        cache = model.cache(len(rows))
        slots = range(len(rows))

        def step(tokens: np.ndarray, cache=cache, slots=slots) -> np.ndarray:
            result = cache.step([Append(i, [int(tokens[i])]) for i in slots])
            return np.stack([result.logits(i)[-1] for i in slots])  # [batch, vocab]

        logits = step(rows[:, 0])
        row_nll = np.zeros((len(rows), rows.shape[1] - 1))
        row_arg = np.zeros((len(rows), rows.shape[1] - 1), np.int64)
        for t in range(1, rows.shape[1]):
            logp = log_softmax(logits.astype(np.float64))  # [batch, vocab]
            row_nll[:, t - 1] = -logp[np.arange(len(rows)), rows[:, t]]
            row_arg[:, t - 1] = logits.argmax(-1)
            if t + 1 < rows.shape[1]:
                t0 = time.perf_counter()
                logits = step(rows[:, t])
                step_ms.append((time.perf_counter() - t0) * 1e3)
        nll.append(row_nll)
        argmax.append(row_arg)
    return (
        float(np.exp(np.concatenate(nll).mean())),
        np.concatenate(argmax),
        float(np.median(step_ms)),
    )


def card_section(results: dict) -> str:
    lines = [
        CARD_START,
        f"Held-out split: {results['blocks']} blocks x {results['block']} tokens "
        f"({results['positions']} scored positions), scored through the gpt2onnx runtime "
        "(fused layout, KV cache, teacher forcing). Top-1 agreement: argmax equal to the "
        "PyTorch fp32 model's.",
        "",
        "| model | held-out perplexity | top-1 agreement with PyTorch fp32 | folder size |",
        "|---|---:|---:|---:|",
        f"| PyTorch fp32 (transformers) | {results['torch']['perplexity']:.2f} | 100 % | "
        f"{results['torch']['size_mb']:.1f} MB (fp16 safetensors) |",
    ]
    for p in PRECISIONS:
        r = results["onnx"].get(p)
        if r:
            lines.append(
                f"| ONNX fused {p} | {r['perplexity']:.2f} | "
                f"{100 * r['top1_agreement']:.2f} % | {r['size_mb']:.1f} MB |"
            )
    lines.append(CARD_END)
    return "\n".join(lines)


def update_card(card: Path, section: str) -> None:
    text = card.read_text()
    if CARD_START in text:
        head, rest = text.split(CARD_START, 1)
        text = head + section + rest.split(CARD_END, 1)[1]
    elif "## Exported precisions" in text:
        head, rest = text.split("## Exported precisions", 1)
        tail = rest.split("\n## ", 1)
        text = (
            head
            + "## Exported precisions\n\n"
            + section
            + "\n"
            + ("\n## " + tail[1] if len(tail) > 1 else "")
        )
    else:
        text += "\n## Exported precisions\n\n" + section + "\n"
    card.write_text(text)


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/pydoc-tiny"))
    p.add_argument("--blocks", type=int, default=48)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--int4-block-size", type=int, nargs="+", default=None,
                   help="score int4 at these block sizes instead, and write nothing")
    args = p.parse_args(argv)
    if args.int4_block_size:
        return compare_int4_blocks(args.model, args.blocks, args.int4_block_size)

    from gpt2onnx.export.api import ExportOptions, export_model

    blocks = heldout_blocks(args.model, args.blocks)
    ppl, ref_argmax = torch_scores(args.model, blocks)
    results: dict = {
        "blocks": len(blocks),
        "block": int(blocks.shape[1]),
        "positions": int(ref_argmax.size),
        "torch": {"perplexity": ppl, "size_mb": folder_mb(args.model)},
        "onnx": {},
    }
    print(f"PyTorch fp32: perplexity {ppl:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            out = Path(tmp) / precision
            report = export_model(
                args.model, out, ExportOptions(layout="fused", precision=precision)
            )
            ppl_p, argmax, ms = runtime_scores(out, blocks)
            agree = float((argmax == ref_argmax).mean())
            results["onnx"][precision] = {
                "perplexity": ppl_p,
                "top1_agreement": agree,
                "size_mb": folder_mb(out),
                "decode_ms_per_step_batch16": ms,
                "validation": report["validation"]["metrics"] if report["validation"] else None,
            }
            print(
                f"ONNX fused {precision}: perplexity {ppl_p:.3f}, top-1 agreement "
                f"{100 * agree:.2f} %"
            )
    (args.model / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    section = card_section(results)
    update_card(args.model / "README.md", section)
    print(section)
    return 0


def compare_int4_blocks(model_dir: Path, n_blocks: int, sizes: list[int]) -> int:
    """Perplexity, top-1 agreement and validation error of int4 at each block size."""
    from gpt2onnx.errors import InvalidParameterError
    from gpt2onnx.export.api import ExportOptions, export_model

    options = [ExportOptions(layout="fused", precision="int4", int4_block_size=size)
               for size in sizes]
    try:
        for opts in options:
            opts.check()  # a bad size fails in a second, before the scoring
    except InvalidParameterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    blocks = heldout_blocks(model_dir, n_blocks)
    ppl, ref_argmax = torch_scores(model_dir, blocks)
    print(f"PyTorch fp32: perplexity {ppl:.3f}")
    print("| block | perplexity | top-1 agreement | validation logits max|diff|/range |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for size, opts in zip(sizes, options, strict=True):
            out = Path(tmp) / f"int4-b{size}"
            report = export_model(model_dir, out, opts)
            ppl_b, argmax, _ = runtime_scores(out, blocks)
            rel = next(c["value"] for c in report["validation"]["checks"]
                       if c["name"].startswith("logits"))
            print(f"| {size} | {ppl_b:.2f} | {100 * float((argmax == ref_argmax).mean()):.2f} % "
                  f"| {rel:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
