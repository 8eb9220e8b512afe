"""python -m gpt2onnx.runtime.generate MODEL_DIR --prompt TEXT [options]

Drives the same ``Model`` API that services embed.
"""

from __future__ import annotations

import argparse
import json
import sys

from gpt2onnx.cli import Parser, int_in, parsed_as, run_main, utf8_text
from gpt2onnx.errors import InvalidParameterError, PromptTooLongError
from gpt2onnx.runtime.drafting import NGRAM, target_spinning
from gpt2onnx.runtime.model import Model, gen_result
from gpt2onnx.runtime.params import (
    MAX_DRAFT_TOKENS,
    MAX_TEMPERATURE,
    MAX_THREADS,
    MAX_TOP_K,
    MIN_TEMPERATURE,
    PENALTY_RANGE,
    REPETITION_PENALTY_RANGE,
    GenerationParams,
)


def add_session_args(p: argparse.ArgumentParser,
                     spin_default: str = "spin, unless GPT2ONNX_SPIN=0") -> None:
    """--provider, --threads and --no-spin: how a CLI's Model builds its session (the
    generate and serve CLIs share them)."""
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None,
                   help=f"onnxruntime intra-op threads, in [1, {MAX_THREADS}] (default: one "
                        "per physical core)")
    p.add_argument("--no-spin", dest="spinning", action="store_false", default=None,
                   help="idle onnxruntime threads sleep instead of busy-waiting: faster on "
                        f"a CPU shared with other busy processes (default: {spin_default})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # The sampling flags (and --num-draft-tokens) are checked by the API they feed
    # (GenerationParams, Model.generator), so the CLI, the Python API and HTTP share one rule
    # and one message; argparse only parses them as numbers (text that is not a number is
    # refused there, naming the range).
    rep_lo, rep_hi = REPETITION_PENALTY_RANGE
    pen_lo, pen_hi = PENALTY_RANGE
    p = Parser(prog="python -m gpt2onnx.runtime.generate",
               description="Generate text from an exported model folder.")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True, type=utf8_text)
    p.add_argument("--max-new-tokens", type=parsed_as(int, "an integer >= 0"), default=32)
    temperature = f"a number: 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"
    p.add_argument("--temperature", type=parsed_as(float, temperature), default=0.0,
                   help=f"0 = greedy (default), else in [1e-4, {MAX_TEMPERATURE:g}]")
    p.add_argument("--top-k", type=parsed_as(int, f"an integer in [0, {MAX_TOP_K}] (0 = off)"),
                   default=0, help=f"in [0, {MAX_TOP_K}]; 0 = off")
    p.add_argument("--top-p", type=parsed_as(float, "a number in (0, 1] (1 = off)"), default=1.0,
                   help="in (0, 1]; 1 = off")
    p.add_argument("--min-p", type=parsed_as(float, "a number in [0, 1] (0 = off)"), default=0.0,
                   help="keep tokens with p >= MIN_P x the top token's p (0 = off)")
    p.add_argument("--repetition-penalty",
                   type=parsed_as(float, f"a number in [{rep_lo:g}, {rep_hi:g}] (1 = off)"),
                   default=1.0, help=f"in [{rep_lo:g}, {rep_hi:g}]; 1 = off")
    penalty = parsed_as(float, f"a number in [{pen_lo:g}, {pen_hi:g}] (0 = off)")
    p.add_argument("--frequency-penalty", type=penalty, default=0.0,
                   help="OpenAI's, over the generated tokens, in [-2, 2]")
    p.add_argument("--presence-penalty", type=penalty, default=0.0,
                   help="OpenAI's, over the generated tokens, in [-2, 2]")
    p.add_argument("--min-tokens", type=parsed_as(int, "an integer in [0, --max-new-tokens]"),
                   default=0, help="no EOS or stop string before this many new tokens")
    p.add_argument("--seed", type=parsed_as(int, "an integer >= 0"), default=None)
    p.add_argument("--stop", action="append", default=[], metavar="STR", type=utf8_text,
                   help="stop string (repeatable)")
    p.add_argument("--truncate", action="store_true",
                   help="shorten the prompt / max-new-tokens to fit the context instead of "
                        "refusing")
    add_session_args(p)
    p.add_argument("--speculative", default=None, metavar="ngram|draft:FOLDER", type=utf8_text,
                   help="speculative decoding: prompt lookup (ngram) or a draft model folder "
                        "with this model's tokenizer; greedy output is unchanged")
    p.add_argument("--draft", default=None, metavar="FOLDER",
                   help="the same as --speculative draft:FOLDER")
    p.add_argument("--num-draft-tokens",
                   type=parsed_as(int, f"an integer in [1, {MAX_DRAFT_TOKENS}]"), default=8,
                   help=f"draft tokens checked per step at most, in [1, {MAX_DRAFT_TOKENS}] "
                        "(default 8)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def speculative_arg(speculative: str | None, draft: str | None) -> str | None:
    """--speculative ngram|draft:FOLDER and --draft FOLDER -> what ``Model.generator``
    takes as ``draft`` ("ngram" or a folder path), or None."""
    if speculative is not None and draft is not None:
        raise InvalidParameterError("draft", "give --speculative or --draft, not both "
                                    "(--draft FOLDER is --speculative draft:FOLDER).")
    if draft is not None:
        return draft
    if speculative is None or speculative == NGRAM:
        return speculative
    if speculative.startswith("draft:") and len(speculative) > len("draft:"):
        return speculative[len("draft:"):]
    raise InvalidParameterError("speculative", f"--speculative must be 'ngram' or "
                                f"'draft:FOLDER', got {speculative!r}.")


def speculative_spinning(spinning: bool | None, draft: object) -> bool | str | None:
    """With a draft model, the target's threads spin only within a run (``"run"``), so
    that they leave the cores to the draft's between runs; --no-spin or GPT2ONNX_SPIN=0
    still turns spinning off. Prompt lookup runs no second model: spinning stays as
    asked."""
    return target_spinning(spinning, draft is not None and draft != NGRAM)


def _json_for_stdout(obj: object) -> str:
    """JSON as readable as stdout allows: with \\uXXXX escapes only where its encoding
    cannot hold the text (the escaping run_main does for plain text is not valid JSON)."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode(sys.stdout.encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return json.dumps(obj)
    return text


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
        min_tokens=args.min_tokens,
        seed=args.seed, stop=tuple(args.stop),
        on_overflow="truncate" if args.truncate else "error")
    draft = speculative_arg(args.speculative, args.draft)
    model = Model(args.model_dir, provider=args.provider, threads=args.threads,
                  spinning=speculative_spinning(args.spinning, draft))
    try:
        gen = model.generator([args.prompt], params, draft=draft,
                              num_draft_tokens=args.num_draft_tokens)
    except PromptTooLongError as exc:
        # The API's fix names its argument (on_overflow='truncate'); this CLI's is a flag.
        raise PromptTooLongError(exc.param, str(exc).replace(
            "on_overflow='truncate'", "--truncate")) from None
    streaming = args.stream and not args.json
    if streaming:
        sys.stdout.write(args.prompt)
    while not gen.is_done():
        gen.generate_next_token()
        if streaming:
            sys.stdout.write(gen.stream_text(0))
            sys.stdout.flush()
    if streaming:
        sys.stdout.write(gen.stream_text(0) + "\n")
        sys.stdout.flush()  # inside run_main, so a closed pipe is reported there
        return 0
    result = gen_result(gen)
    if args.json:
        out = result.to_dict()
        if gen.drafter is not None:
            out["speculation"] = gen.speculation.to_dict()
        print(_json_for_stdout(out), flush=True)
    else:
        print(args.prompt + result.text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
