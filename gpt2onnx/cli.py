"""What every command-line entry point shares: a parser whose errors are one line, typed
ranges for numeric flags, and ``run_main``, which turns every error a user can cause into
one line on stderr and an exit status (2 for errors, 130 for Ctrl-C, 143 for SIGTERM, 141
for a closed stdout pipe) instead of a traceback.

Each CLI's ``main(argv=None) -> int`` is ``return run_main(lambda: _main(argv))``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from gpt2onnx.errors import Gpt2OnnxError

EXIT_ERROR = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141: what a shell reports for `cmd | head`
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose ``error()`` prints one line, ``PROG: error: MESSAGE (try
    --help)``, to stderr and exits 2, without the usage dump (which buries the message).
    Subparsers made by ``add_subparsers`` are Parsers too (argparse uses ``type(self)``)."""

    def error(self, message: str) -> NoReturn:
        one_line = " ".join(message.split())
        self.exit(EXIT_ERROR, f"{self.prog}: error: {one_line} (try --help)\n")


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` that takes an integer in [lo, hi] (hi None: no upper bound)."""
    span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer {span}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                f"must be {span}, got {value}; pass a value in that range")
        return value

    parse.__name__ = f"integer {span}"
    return parse


def float_in(lo: float, hi: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type=`` that takes a finite number in [lo, hi] ((lo, hi] with
    ``low_open``); "nan" and "inf", which float() accepts, are refused."""
    span = f"{'(' if low_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a number in {span}, got {text!r}") from None
        below = value <= lo if low_open else value < lo
        if not math.isfinite(value) or below or value > hi:
            raise argparse.ArgumentTypeError(
                f"must be a finite number in {span}, got {text!r}; pass a value in that range")
        return value

    parse.__name__ = f"number in {span}"
    return parse


def parsed_as(kind: type, expected: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that only parses ``kind`` (int or float): text that is not one
    is refused naming what the flag takes (``expected``); the range itself is the API's
    to check, with its message."""

    def parse(text: str) -> Any:
        try:
            return kind(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None

    parse.__name__ = expected
    return parse


def utf8_text(value: str) -> str:
    """An argparse ``type=`` for text: argv bytes that are not UTF-8 reach Python as lone
    surrogates (PEP 383), which would fail later, deep in the tokenizer, as a TypeError."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = value.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
        raise argparse.ArgumentTypeError(
            f"is not valid UTF-8 text ({shown}); pass UTF-8 (set the terminal or the "
            "calling program to a UTF-8 locale, or convert the text with iconv)") from None
    return value


class Terminated(KeyboardInterrupt):
    """Raised by run_main's SIGTERM handler, so that ``finally`` blocks clean up as they do
    on Ctrl-C (a KeyboardInterrupt subclass: code that handles Ctrl-C handles this too)."""


def run_main(body: Callable[[], int]) -> int:
    """Run a CLI body and return its exit status.

    SIGTERM raises ``Terminated`` inside the body, once: a second SIGTERM during the
    cleanup kills the process (the default action). A ``Gpt2OnnxError`` or ``OSError``
    becomes ``error: MESSAGE`` on one stderr line and 2; Ctrl-C ``interrupted`` and 130;
    SIGTERM ``terminated`` and 143; a closed stdout pipe (``cmd | head``) is silent, 141.
    Text that stdout or stderr cannot encode is backslash-escaped, not a
    UnicodeEncodeError. ``SystemExit`` (argparse, --help) passes through.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a closed stream: leave it
                reconfigure(errors="backslashreplace")
    previous = _install_sigterm()
    _arm_sigint()
    try:
        return body()
    except Terminated:
        _say("terminated")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if not _stdout_is_broken():
            _say("error: broken pipe (the other end of a connection or pipe closed)")
            return EXIT_ERROR
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (Gpt2OnnxError, OSError) as exc:
        _say(f"error: {_message(exc)}")
        return EXIT_ERROR
    finally:
        _restore_sigterm(previous)


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one line, whatever the message holds
    return text or type(exc).__name__


def _say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # stderr is gone: nothing to tell
        print(line, file=sys.stderr, flush=True)


_NOT_INSTALLED = object()


def _install_sigterm() -> object:
    def on_sigterm(signum: int, frame: object) -> None:
        # A second SIGTERM during the cleanup this one starts ends the process at once,
        # as a second Ctrl-C would: the process can always be stopped.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (a CLI body run from a test thread)
        return _NOT_INSTALLED


def _arm_sigint() -> None:
    """Re-install Python's Ctrl-C handler where it is the default one: a native library
    can replace the C-level handler under Python's record of it, after which SIGINT was
    seen to be caught but never raised (a reviewer's runs of the score and export CLIs).
    An ignored SIGINT (nohup, a background job) stays ignored."""
    with contextlib.suppress(ValueError, TypeError):  # not the main thread
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _restore_sigterm(previous: object) -> None:
    if previous is _NOT_INSTALLED:
        return
    with contextlib.suppress(ValueError, TypeError):
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _stdout_is_broken() -> bool:
    """Whether stdout's reader is gone: a pipe whose read end closed polls as an error.
    A BrokenPipeError from anything else (a socket) is reported as an error instead."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    try:
        import select

        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() on this platform
        return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of what is still buffered
    raises nothing (the recipe in Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, ValueError, OSError):
        pass
