"""Stop strings: the automaton against a brute-force reading of the same text."""

from __future__ import annotations

import random

import pytest

from gpt2onnx.runtime.stops import StopText


def _reference(pieces: list[str], stops: tuple[str, ...], early: int = 0) -> tuple[str, int]:
    """(text, pieces taken): cut before the first stop that ends, scanning piece by
    piece as generation does; pieces before ``early`` are not checked."""
    text = ""
    for n, piece in enumerate(pieces, 1):
        before = len(text)
        text += piece
        if n <= early:
            continue
        # The first stop to *end* in this piece; among those ending together, the longest.
        best = None
        for end in range(before + 1, len(text) + 1):
            hits = [s for s in stops if end >= len(s) and text[end - len(s):end] == s]
            if hits:
                best = end - max(len(s) for s in hits)
                break
        if best is not None:
            return text[:best], n
    return text, len(pieces)


def _held(text: str, stops: tuple[str, ...]) -> int:
    """Longest tail of ``text`` that is a prefix of a stop string (a whole one only
    where it ended before min_tokens, when it could not stop the row)."""
    return max([n for s in stops for n in range(1, len(s) + 1) if text.endswith(s[:n])],
               default=0)


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab c"
    stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
                   for _ in range(rng.randint(1, 4))})
    pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
              for _ in range(60)]
    early = rng.choice([0, 0, 3])
    want, taken = _reference(pieces, stops, early)
    out = StopText(stops)
    streamed = ""
    for n, piece in enumerate(pieces, 1):
        stopped = out.add(piece, check=n > early)
        done = stopped or n == len(pieces)
        streamed += out.take_new(done)
        if not done:
            # What a stream may show: everything but a tail that may still become a stop.
            assert streamed == out.text[:len(out.text) - _held(out.text, stops)]
        if stopped:
            break
    assert (out.text, n) == (want, taken)
    assert streamed == want


def test_no_stops_keeps_everything() -> None:
    out = StopText(())
    for piece in ["Hello", ",", " world"]:
        assert not out.add(piece)
    assert out.take_new(False) == "Hello, world"
    assert out.text == "Hello, world"


def test_pending_text_stays_short_with_long_stops() -> None:
    """Committed text is never copied again: only a stop's length stays pending."""
    stops = tuple("x" * 199 + chr(ord("a") + i) for i in range(16))
    out = StopText(stops)
    for _ in range(5000):
        assert not out.add("x y ")
        assert len(out._pending) <= 200
    assert not out.add("x" * 199)
    assert out._pending == "x" * 199  # all of it may still become a stop
    assert out.add("xc")
    assert out.text.endswith("x y x")  # cut before the 200-character stop


def test_stop_spanning_pieces_and_unicode() -> None:
    out = StopText(("умru",))
    assert not out.add("Мы ")
    assert not out.add("ум")
    assert out.take_new(False) == "Мы "
    assert out.add("ru!")
    assert out.text == "Мы "
