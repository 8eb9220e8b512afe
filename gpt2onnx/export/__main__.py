"""python -m gpt2onnx.export SOURCE OUT_DIR [--layout ...] [--precision ...] [...]"""

from __future__ import annotations

import argparse
import sys

from gpt2onnx.cli import Parser, int_in, run_main, utf8_text
from gpt2onnx.contract import LAYOUTS, PRECISIONS
from gpt2onnx.export.api import DEFAULT_LAYOUT, ExportOptions, export_model
from gpt2onnx.export.precision import INT4_BLOCK_SIZE, INT4_BLOCK_SIZES

# The longest cache a fused folder may ask for; the model's n_positions bounds it further
# (checked once the checkpoint is loaded).
MAX_LENGTH_LIMIT = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        prog="python -m gpt2onnx.export",
        description="Export a Hugging Face GPT-2 checkpoint (local folder or hub id) to an "
                    "ONNX model folder with a KV cache, validated against PyTorch.")
    p.add_argument("source", type=utf8_text,
                   help="checkpoint folder or hub id (gpt2, distilgpt2, ...)")
    p.add_argument("out_dir", type=utf8_text,
                   help="model folder to write: new, empty, or an earlier gpt2onnx export "
                        "(replaced); anything else is refused. A symlink is written through.")
    p.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help=f"graph layout (default: {DEFAULT_LAYOUT})")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="provider a fused folder is built for (default: cpu)")
    p.add_argument("--max-length", type=int_in(2, MAX_LENGTH_LIMIT), default=None,
                   help="fused cache capacity in tokens (default: the model's n_positions)")
    p.add_argument("--tokenizer", type=utf8_text, default=None,
                   help="tokenizer source (default: SOURCE); its ids must fit the model's "
                        "vocab_size")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the comparison with the PyTorch model")
    p.add_argument("--no-mixed-graph", action="store_true",
                   help="fused CPU folders: do not write model_mixed.onnx (the serving "
                        "engine then runs prompt chunks and decode rows as separate runs)")
    p.add_argument("--int4-block-size", type=int, choices=INT4_BLOCK_SIZES, default=None,
                   help=f"--precision int4: weights per quantization block (default: "
                        f"{INT4_BLOCK_SIZE}); larger blocks are faster and less close to "
                        "fp32")
    return p.parse_args(argv)


def quiet_transformers() -> None:
    """One line per error on a terminal: transformers' load report tables, config
    warnings and progress bars would bury it (the exporter raises what matters)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    opts = ExportOptions(layout=args.layout, precision=args.precision, provider=args.provider,
                         max_length=args.max_length, validate=not args.no_validate,
                         tokenizer=args.tokenizer, mixed_graph=not args.no_mixed_graph,
                         int4_block_size=args.int4_block_size)
    export_model(args.source, args.out_dir, opts)
    print(f"wrote {args.out_dir} ({args.layout}, {args.precision})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; 2 with one line on stderr for any error a user can cause; 130
    on Ctrl-C and 143 on SIGTERM, with the staging folder removed and an older export
    intact."""
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
