"""python -m gpt2onnx.runtime.score MODEL_DIR FILE... [--window W] [--stride S] [--json]

Perplexity, bits per byte and token count per file and overall, through
``gpt2onnx.runtime.scoring`` (texts longer than the context use a sliding window).
Bits per byte count the scored tokens' negative log-likelihood over the file's UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from gpt2onnx.cli import Parser, int_in, run_main
from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.scoring import ScoreResult, score_ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from gpt2onnx.runtime.generate import add_session_args

    p = Parser(prog="python -m gpt2onnx.runtime.score",
               description="Perplexity and bits per byte of text files.")
    p.add_argument("model_dir")
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files ('-' = stdin)")
    # Upper bounds depend on the model's context: scoring.score_ids checks those.
    p.add_argument("--window", type=int_in(2), default=None,
                   help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int_in(1), default=None,
                   help="tokens between window starts (default: half the window)")
    add_session_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")
    return p.parse_args(argv)


def _read(name: str) -> str:
    try:
        if name == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(name).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParameterError("file", f"{name} is not UTF-8 text ({exc.reason} at byte "
                                    f"{exc.start}); convert it to UTF-8.") from exc
    except OSError as exc:
        raise InvalidParameterError("file", f"cannot read {name}: {exc.strerror}; pass a "
                                    "readable text file.") from exc


def _bar(total: int, enabled: bool, name: str) -> tuple[Callable[[int], None] | None,
                                                        Callable[[], None]]:
    """A tqdm progress bar when tqdm is installed (it is optional for the runtime)."""
    if not enabled or total < 4096:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        return None, lambda: None
    bar = tqdm(total=total, unit="tok", desc=name, file=sys.stderr, leave=False)
    return bar.update, bar.close


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from gpt2onnx.runtime.model import Model

    texts = [(name, _read(name)) for name in args.files]
    model = Model(args.model_dir, provider=args.provider, threads=args.threads,
                  spinning=args.spinning)
    rows = []
    for name, text in texts:
        ids = model.encode(text)
        update, close = _bar(len(ids), args.progress and sys.stderr.isatty(), name)
        try:
            r = score_ids(model, ids, window=args.window, stride=args.stride,
                          progress=update)
        finally:
            close()
        rows.append(_summary(name, r, len(text.encode("utf-8"))))
    nll = sum(r["nll"] for r in rows)
    scored = sum(r["tokens_scored"] for r in rows)
    n_bytes = sum(r["bytes"] for r in rows)
    overall = {"tokens_scored": scored, "bytes": n_bytes, "nll": nll,
               "perplexity": math.exp(nll / scored) if scored else float("nan"),
               "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan")}
    if args.json:
        print(json.dumps({"files": rows, "overall": overall}), flush=True)
        return 0
    print(f"{'file':<40} {'tokens':>8} {'perplexity':>12} {'bits/byte':>10}")
    for r in [*rows, {"file": "overall", **overall}] if len(rows) > 1 else rows:
        print(f"{r['file']:<40} {r['tokens_scored']:>8} {r['perplexity']:>12.4f} "
              f"{r['bits_per_byte']:>10.4f}")
    sys.stdout.flush()  # inside run_main, so a closed pipe is reported there
    return 0


def _summary(name: str, r: ScoreResult, n_bytes: int) -> dict:
    nll = -r.total_logprob
    return {"file": name, "tokens": len(r.token_ids), "tokens_scored": r.scored,
            "bytes": n_bytes, "nll": nll, "perplexity": r.perplexity,
            "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan")}


if __name__ == "__main__":
    sys.exit(main())
