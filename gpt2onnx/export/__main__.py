"""python -m gpt2onnx.export SOURCE OUT_DIR [--layout ...] [--precision ...] [...]"""

from __future__ import annotations

import argparse
import sys

from gpt2onnx.contract import LAYOUTS, PRECISIONS
from gpt2onnx.errors import Gpt2OnnxError
from gpt2onnx.export.api import DEFAULT_LAYOUT, ExportOptions, export_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m gpt2onnx.export",
        description="Export a Hugging Face GPT-2 checkpoint (local folder or hub id) to an "
                    "ONNX model folder with a KV cache, validated against PyTorch.")
    p.add_argument("source", help="checkpoint folder or hub id (gpt2, distilgpt2, ...)")
    p.add_argument("out_dir", help="model folder to write (replaced if it is an older export)")
    p.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help=f"graph layout (default: {DEFAULT_LAYOUT})")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="provider a fused folder is built for (default: cpu)")
    p.add_argument("--max-length", type=int, default=None,
                   help="fused cache capacity in tokens (default: the model's n_positions)")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: SOURCE)")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the comparison with the PyTorch model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = ExportOptions(layout=args.layout, precision=args.precision, provider=args.provider,
                         max_length=args.max_length, validate=not args.no_validate,
                         tokenizer=args.tokenizer)
    try:
        export_model(args.source, args.out_dir, opts)
    except Gpt2OnnxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_dir} ({args.layout}, {args.precision})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
