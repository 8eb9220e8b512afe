"""Issue 16, the CLI and sampling edges: every CLI turns what a user can cause (bad flags, bad
bytes, closed pipes, encodings, signals) into one stderr line and an exit status, and no
accepted sampling parameter can overflow float32."""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2onnx.cli import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Parser,
    Terminated,
    float_in,
    int_in,
    run_main,
    utf8_text,
)
from gpt2onnx.errors import InvalidParameterError, ModelFolderError
from gpt2onnx.runtime import GenerationParams, Model
from gpt2onnx.runtime.params import (
    MAX_TEMPERATURE,
    MAX_THREADS,
    MAX_TOP_K,
    MIN_TEMPERATURE,
    check_threads,
)
from gpt2onnx.runtime.sampling import RowSampler, pick_tokens
from tests.conftest import default_sigint

GENERATE = [sys.executable, "-m", "gpt2onnx.runtime.generate"]


def run_cli(argv: list, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a CLI; argv items may be bytes (argv that is not UTF-8)."""
    return subprocess.run(argv, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The CLI failed with exit 2 and one stderr line (no traceback) holding ``words``."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    for word in words:
        assert word in err, (word, err)
    return err


# ---- gpt2onnx.cli itself ------------------------------------------------------------------

def test_parser_errors_are_one_line_with_a_help_hint(capsys: pytest.CaptureFixture[str]) -> None:
    p = Parser(prog="tool")
    p.add_argument("--n", type=int_in(1, 8))
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--n", "9"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "tool: error: argument --n: must be in [1, 8], got 9; pass a value in " \
                  "that range (try --help)\n"


@pytest.mark.parametrize(("kind", "text", "ok"), [
    (int_in(1, 8), "1", 1), (int_in(1, 8), "8", 8), (int_in(0), "123456789", 123456789),
    (float_in(0.0, 1.0), "0", 0.0), (float_in(0.0, 1.0, low_open=True), "1", 1.0),
])
def test_ranges_accept_their_bounds(kind, text: str, ok: float) -> None:
    assert kind(text) == ok


@pytest.mark.parametrize(("kind", "text", "words"), [
    (int_in(1, 8), "0", "in [1, 8], got 0"), (int_in(1, 8), "9", "got 9"),
    (int_in(1, 8), "-1", "got -1"), (int_in(1), "1.5", "must be an integer >= 1"),
    (int_in(1), "x", "got 'x'"),
    (float_in(0.0, 1.0, low_open=True), "0", "(0, 1]"), (float_in(0.0, 1.0), "1.01", "[0, 1]"),
    (float_in(0.0, 1.0), "nan", "finite"), (float_in(-1.0, 1.0), "-inf", "finite"),
    (float_in(0.0, 1.0), "one", "must be a number"),
])
def test_ranges_refuse_what_is_outside(kind, text: str, words: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        kind(text)
    assert words in str(exc.value)


def test_utf8_text_refuses_lone_surrogates() -> None:
    assert utf8_text("héllo ✓") == "héllo ✓"
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands argv over
    with pytest.raises(argparse.ArgumentTypeError, match=r"not valid UTF-8 text \(caf\\xe9\)"):
        utf8_text(undecodable)


def _raises(exc: BaseException):
    def body() -> int:
        raise exc
    return body


@pytest.mark.parametrize(("exc", "status", "line"), [
    (InvalidParameterError("x", "x must be 1, got 2."), 2, "error: x must be 1, got 2.\n"),
    (ModelFolderError("two\nlines"), 2, "error: two lines\n"),
    (FileNotFoundError(2, "No such file or directory", "out.json"), 2,
     "error: [Errno 2] No such file or directory: 'out.json'\n"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted\n"),
    (Terminated(), EXIT_TERMINATED, "terminated\n"),
])
def test_run_main_turns_user_errors_into_one_line(exc: BaseException, status: int, line: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(_raises(exc)) == status
    assert capsys.readouterr().err == line


def test_run_main_lets_bugs_and_argparse_exits_through() -> None:
    with pytest.raises(SystemExit):
        run_main(_raises(SystemExit(2)))
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main(lambda: 1 // 0)


def test_run_main_restores_the_sigterm_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    assert run_main(lambda: seen.append(signal.getsignal(signal.SIGTERM)) or 0) == 0
    assert seen[0] is not before and signal.getsignal(signal.SIGTERM) is before


def test_sigterm_raises_terminated_once_so_cleanup_runs() -> None:
    seen: dict[str, object] = {}

    def body() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # interrupted by the handler's Terminated
        finally:
            seen["cleanup"] = signal.getsignal(signal.SIGTERM)
        return 0

    started = time.monotonic()
    assert run_main(body) == EXIT_TERMINATED
    assert time.monotonic() - started < 5
    assert seen["cleanup"] == signal.SIG_DFL  # a second SIGTERM would end it at once


# ---- threads ------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [0, -1, MAX_THREADS + 1, 100_000, 1.5, "4", True])
def test_check_threads_refuses_out_of_range(threads: object) -> None:
    with pytest.raises(InvalidParameterError, match="threads must be") as exc:
        check_threads(threads)
    assert exc.value.param == "threads"


def test_check_threads_accepts_its_range() -> None:
    for threads in (None, 1, MAX_THREADS):
        check_threads(threads)


# ---- generate: flags with ranges (all fail before the model loads) -----------------------
# Sampling flags and --num-draft-tokens are refused with the API's message (HTTP's too);
# the session's --threads by its argparse range.

@pytest.mark.parametrize(("flags", "words"), [
    (["--threads", "100000"], ("--threads", f"[1, {MAX_THREADS}]", "100000")),
    (["--threads", "-1"], ("--threads", "got -1")),
    (["--threads", "0"], ("--threads", "got 0")),
    (["--num-draft-tokens", "0"], ("num_draft_tokens must be an integer in [1, 16]",)),
    (["--num-draft-tokens", "17"], ("num_draft_tokens must be an integer in [1, 16]",)),
    (["--max-new-tokens", "-1"], ("max_new_tokens must be >= 0",)),
    (["--max-new-tokens", "many"], ("--max-new-tokens", "must be an integer >= 0, got 'many'")),
    (["--top-k", "1e5"], ("--top-k", f"must be an integer in [0, {MAX_TOP_K}]", "'1e5'")),
    (["--num-draft-tokens", "nan"], ("--num-draft-tokens", "must be an integer in [1, 16]")),
    (["--temperature", "abc"], ("--temperature", "[0.0001, 10000]", "'abc'")),
    (["--top-k", str(2**31)], (f"top_k must be <= {MAX_TOP_K}",)),
    (["--top-k", "-3"], ("top_k must be >= 0",)),
    (["--temperature", "3e38"], ("temperature must be <= 10000", "3e+38")),
    (["--temperature", "nan"], ("temperature must be finite",)),
    (["--temperature", "1e-39"], ("temperature must be 0 or >= 0.0001", "1e-39")),
    (["--repetition-penalty", "1e-300"], ("repetition_penalty must be", "[0.01, 100]")),
    (["--frequency-penalty", "inf"], ("frequency_penalty must be finite",)),
    (["--top-p", "0"], ("top_p must be in (0, 1]",)),
    (["--seed", "-1"], ("seed must be a non-negative integer",)),
    (["--speculative", "draft"], ("--speculative must be 'ngram' or 'draft:FOLDER'",)),
])
def test_generate_refuses_out_of_range_flags(tiny_fused: Path, flags: list[str],
                                             words: tuple[str, ...]) -> None:
    proc = run_cli([*GENERATE, str(tiny_fused), "--prompt", "Hi", *flags])
    one_line_error(proc, *words)


# Text that is no number is refused by argparse, naming what the flag takes (the API checks
# the range of numbers, with the messages above).
_EXPECTED = {
    "--max-new-tokens": "an integer >= 0",
    "--top-k": f"an integer in [0, {MAX_TOP_K}]",
    "--min-tokens": "an integer in [0, --max-new-tokens]",
    "--seed": "an integer >= 0",
    "--num-draft-tokens": "an integer in [1, 16]",
    "--temperature": f"a number: 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]",
    "--top-p": "a number in (0, 1]",
    "--min-p": "a number in [0, 1]",
    "--repetition-penalty": "a number in [0.01, 100]",
    "--frequency-penalty": "a number in [-2, 2]",
    "--presence-penalty": "a number in [-2, 2]",
}


@pytest.mark.parametrize("flag", sorted(_EXPECTED))
def test_generate_numeric_flags_name_what_they_take(flag: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from gpt2onnx.runtime.generate import parse_args

    int_flag = _EXPECTED[flag].startswith("an integer")  # "1e5" is a float
    for text in ("abc", "1e5", "nan", "") if int_flag else ("abc", "1,5", ""):
        with pytest.raises(SystemExit) as exc:
            parse_args(["m", "--prompt", "Hi", flag, text])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "invalid" not in err, err
        assert flag in err and f"must be {_EXPECTED[flag]}" in err and repr(text) in err, err


def test_generate_number_flags_still_parse(tiny_fused: Path) -> None:
    from gpt2onnx.runtime.generate import parse_args

    args = parse_args(["m", "--prompt", "Hi", "--max-new-tokens", " 7 ", "--top-k", "-3",
                       "--temperature", "nan", "--top-p", "0.5", "--seed", "12"])
    assert (args.max_new_tokens, args.top_k, args.top_p, args.seed) == (7, -3, 0.5, 12)
    assert math.isnan(args.temperature)  # the API refuses it, with its message


def test_a_prompt_too_long_names_the_cli_flag(tiny_fused: Path) -> None:
    context = Model(tiny_fused).context_length
    proc = run_cli([*GENERATE, str(tiny_fused), "--prompt", "Hello " * (2 * context)])
    err = one_line_error(proc, "Shorten the prompt or pass --truncate")
    assert "on_overflow" not in err
    proc = run_cli([*GENERATE, str(tiny_fused), "--prompt", "Hi", "--max-new-tokens",
                    str(10 * context)])
    err = one_line_error(proc, "new tokens or pass --truncate")
    assert "on_overflow" not in err
    ok = run_cli([*GENERATE, str(tiny_fused), "--prompt", "Hello " * (2 * context),
                  "--max-new-tokens", "2", "--truncate"])
    assert ok.returncode == 0, ok.stderr


def test_the_api_still_names_on_overflow(tiny_fused: Path) -> None:
    from gpt2onnx.errors import PromptTooLongError

    model = Model(tiny_fused)
    with pytest.raises(PromptTooLongError, match="on_overflow='truncate'"):
        model.generator(["Hi"], GenerationParams(max_new_tokens=10 * model.context_length))


def test_generate_refuses_a_prompt_that_is_not_utf8(tiny_fused: Path) -> None:
    proc = run_cli([*GENERATE, str(tiny_fused), "--prompt", b"caf\xe9 \xff"])
    one_line_error(proc, "--prompt", "not valid UTF-8", "caf\\xe9")


def test_generate_missing_folder_is_one_line(tmp_path: Path) -> None:
    proc = run_cli([*GENERATE, str(tmp_path / "nothing"), "--prompt", "Hi"])
    one_line_error(proc, "error: ", "does not exist")


def test_generate_into_a_closed_pipe_is_silent(tiny_fused: Path) -> None:
    """`generate ... | head -c 1`: the reader goes away; no BrokenPipeError traceback."""
    script = (f"{' '.join(GENERATE)} {tiny_fused} --prompt Hello --max-new-tokens 40 --stream"
              " | head -c 1 >/dev/null; echo \"rc=${PIPESTATUS[0]}\" >&2")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    # head may also exit after the last write; either way nothing but the status is printed
    assert lines[-1] in (f"rc={EXIT_BROKEN_PIPE}", "rc=0") and len(lines) == 1, proc.stderr


def test_generate_into_a_pipe_closed_before_the_output(tiny_fused: Path) -> None:
    proc = subprocess.Popen([*GENERATE, str(tiny_fused), "--prompt", "Hello",
                             "--max-new-tokens", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the model has loaded: its first write meets no reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE, err
    assert err == ""


def test_generate_escapes_what_stdout_cannot_encode(tiny_fused: Path) -> None:
    proc = run_cli([*GENERATE, str(tiny_fused), "--prompt", "héllo ✓", "--max-new-tokens", "2"],
                   env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(b"h\\xe9llo \\u2713")
    assert proc.stderr == b""


SLOW_GENERATE = textwrap.dedent("""
    import sys, time
    from gpt2onnx.runtime import generator
    from gpt2onnx.runtime.generate import main

    step = generator.Generator.generate_next_token

    def slow_step(self):  # a model slow enough to be interrupted mid-generation
        time.sleep(0.2)
        return step(self)

    generator.Generator.generate_next_token = slow_step
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize(("sig", "status", "line"), [
    (signal.SIGINT, EXIT_INTERRUPTED, "interrupted"),
    (signal.SIGTERM, EXIT_TERMINATED, "terminated"),
])
def test_generate_stops_on_a_signal_with_one_line(tiny_fused: Path, sig: int, status: int,
                                                  line: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_GENERATE, str(tiny_fused), "--prompt",
                             "Hello", "--max-new-tokens", "100", "--stream",
                             "--temperature", "0.8", "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)
    try:
        assert proc.stdout.read(1)  # generation has begun (the first flush)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == status
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr.read().decode() == line + "\n"


# ---- score, serve, loadtest, kvmem --------------------------------------------------------

SCORE = [sys.executable, "-m", "gpt2onnx.runtime.score"]


def test_score_refuses_bad_flags_and_files(tiny_fused: Path, tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("Hello world, hello again.")
    one_line_error(run_cli([*SCORE, str(tiny_fused), str(text), "--window", "1"]),
                   "--window", ">= 2")
    one_line_error(run_cli([*SCORE, str(tiny_fused), str(text), "--threads", "-1"]), "--threads")
    one_line_error(run_cli([*SCORE, str(tiny_fused), str(tmp_path / "none.txt")]),
                   "error: cannot read")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9")
    one_line_error(run_cli([*SCORE, str(tiny_fused), str(latin1)]), "is not UTF-8 text")
    window = run_cli([*SCORE, str(tiny_fused), str(text), "--window", "100000"])
    one_line_error(window, "window must be an integer in [2, 128]")


@pytest.mark.parametrize(("flags", "words"), [
    (["--threads", "100000"], ("--threads", f"[1, {MAX_THREADS}]")),
    (["--threads", "-1"], ("--threads",)),
    (["--port", "x"], ("--port",)),
    (["--api-key", b"k\xff"], ("--api-key", "not valid UTF-8")),
])
def test_serve_refuses_bad_flags(tiny_fused: Path, flags: list, words: tuple[str, ...]) -> None:
    proc = run_cli([sys.executable, "-m", "gpt2onnx.serve", str(tiny_fused), *flags])
    one_line_error(proc, *words)


@pytest.mark.parametrize(("flags", "words"), [
    (["--concurrency", "0"], ("--concurrency", "got 0")),
    (["--concurrency", "1000000"], ("--concurrency", "[1, 10000]")),
    (["--requests", "-5"], ("--requests",)),
    (["--temperature", "nan"], ("--temperature", "finite")),
    (["--temperature", "1e39"], ("--temperature",)),
    (["--timeout", "0"], ("--timeout",)),
    (["--prompt", b"\xff"], ("--prompt", "UTF-8")),
    # Refused before the run (the server here is unreachable: the check must come first).
    (["--json", "/nonexistent/dir/report.json"], ("--json", "does not exist")),
])
def test_loadtest_refuses_bad_flags(flags: list, words: tuple[str, ...]) -> None:
    proc = run_cli([sys.executable, "-m", "gpt2onnx.loadtest", "http://127.0.0.1:9", *flags])
    one_line_error(proc, *words)


def test_loadtest_unreachable_server_is_one_line() -> None:
    proc = run_cli([sys.executable, "-m", "gpt2onnx.loadtest", "http://127.0.0.1:9",
                    "--requests", "1", "--timeout", "5"])
    one_line_error(proc, "error: cannot reach")


def test_kvmem_refuses_bad_sizes() -> None:
    kvmem = [sys.executable, "-m", "gpt2onnx.kvmem"]
    one_line_error(run_cli([*kvmem, "--batch", "0"]), "--batch", "got 0")
    one_line_error(run_cli([*kvmem, "--seq", "10**9"]), "--seq")
    ok = run_cli([*kvmem, "--model", "gpt2", "--batch", "1", "--seq", "8"])
    assert ok.returncode == 0 and b"gpt2" in ok.stdout


# ---- sampling parameters and float32 ------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "param", "words"), [
    ({"temperature": MAX_TEMPERATURE * 1.01}, "temperature", "temperature must be <= 10000"),
    ({"temperature": 3e38}, "temperature", "got 3e+38"),
    ({"temperature": 1e39}, "temperature", "got 1e+39"),
    ({"temperature": 1e-39}, "temperature", "temperature must be 0 or >= 0.0001"),
    ({"top_k": MAX_TOP_K + 1}, "top_k", f"top_k must be <= {MAX_TOP_K}"),
    ({"top_k": 10**30}, "top_k", "got 1000000000000000000000000000000"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty", "[0.01, 100]"),
    ({"repetition_penalty": 1e300}, "repetition_penalty", "[0.01, 100]"),
    ({"frequency_penalty": -1e300}, "frequency_penalty", "[-2, 2]"),
    ({"presence_penalty": math.nan}, "presence_penalty", "finite"),
    ({"min_p": math.inf}, "min_p", "finite"),
])
def test_sampling_parameters_float32_cannot_hold_are_refused(kwargs: dict, param: str,
                                                             words: str) -> None:
    with pytest.raises(InvalidParameterError) as exc:
        GenerationParams(**kwargs)
    assert exc.value.param == param and words in str(exc.value)


def _pick(logits: np.ndarray, params: GenerationParams, seen: list[int], draws: int,
          eos: int | None = None) -> np.ndarray:
    sampler = RowSampler(params, seen, eos)
    rows = np.repeat(logits[None], draws, axis=0)
    return pick_tokens(rows, [sampler] * draws)


def test_lowest_temperature_is_greedy_and_finite_on_large_logits() -> None:
    """1e3 / 1e-4 = 1e7: far from float32's 3.4e38, so the draw is the argmax, not garbage."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(512) * 1e3).astype(np.float32)
    picked = _pick(logits, GenerationParams(temperature=MIN_TEMPERATURE, seed=0), [], 64)
    assert (picked == logits.argmax()).all()


def test_highest_temperature_and_top_k_draw_from_the_whole_vocabulary() -> None:
    """At 1e4 the scaled logits stay finite and the draw is near uniform: not stuck on the
    highest ids (what an overflow to inf/NaN gives)."""
    vocab = 64
    logits = np.linspace(-30, 30, vocab, dtype=np.float32)
    params = GenerationParams(temperature=MAX_TEMPERATURE, top_k=MAX_TOP_K, seed=0)
    picked = _pick(logits, params, [], 4000)
    counts = np.bincount(picked, minlength=vocab)
    assert counts.min() > 0 and abs(picked.mean() - (vocab - 1) / 2) < 3


@pytest.mark.parametrize("penalty", [0.01, 100.0])
def test_repetition_penalty_at_its_bounds_stays_finite(penalty: float) -> None:
    """Greedy with the penalty at either bound: the penalised scores are finite, so the pick
    is the argmax of what the penalty leaves (computed here with float64)."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(256) * 50).astype(np.float32)
    seen = list(range(0, 256, 3))
    params = GenerationParams(temperature=0, repetition_penalty=penalty)
    expected = logits.astype(np.float64)
    at = np.array(seen)
    expected[at] = np.where(expected[at] < 0, expected[at] * penalty, expected[at] / penalty)
    assert int(_pick(logits, params, seen, 1)[0]) == int(expected.argmax())


def test_generation_at_every_bound_gives_ids_of_the_vocabulary(tiny_fused: Path) -> None:
    model = Model(tiny_fused)
    vocab = model.manifest.vocab_size
    for kwargs in ({"temperature": MAX_TEMPERATURE, "top_k": MAX_TOP_K},
                   {"temperature": MIN_TEMPERATURE, "repetition_penalty": 100.0},
                   {"temperature": MIN_TEMPERATURE, "repetition_penalty": 0.01,
                    "frequency_penalty": -2.0, "presence_penalty": 2.0}):
        out = model.generate("Hello", max_new_tokens=8, seed=3, stop_on_eos=False, **kwargs)
        assert len(out.token_ids) == 8
        assert all(0 <= t < vocab for t in out.token_ids), kwargs
    # the lowest temperature is greedy in effect
    greedy = model.generate("Hello", max_new_tokens=8, stop_on_eos=False).token_ids
    cold = model.generate("Hello", max_new_tokens=8, temperature=MIN_TEMPERATURE, seed=5,
                          stop_on_eos=False).token_ids
    assert cold == greedy


def test_bench_refuses_bad_runs() -> None:
    proc = run_cli([sys.executable, "-m", "gpt2onnx.bench", "--runs", "0"])
    one_line_error(proc, "--runs", "[1, 10000]", "got 0")


def test_json_output_stays_valid_json_on_an_ascii_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import json

    from gpt2onnx.runtime.generate import _json_for_stdout

    obj = {"text": "héllo ✓"}
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    assert json.loads(_json_for_stdout(obj)) == obj and _json_for_stdout(obj).isascii()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    assert _json_for_stdout(obj) == '{"text": "héllo ✓"}'  # readable where it can be
