"""Scoring: each token's log-probability given the text before it, and perplexity.

Texts longer than the context are scored with a sliding window, as the transformers
perplexity guide does: windows of ``window`` tokens start every ``stride`` tokens, and
each token is scored once, in the first window that ends with it, with up to
``window - stride`` tokens of context before the new ones. The first token of a text has
no context and no score. Scoring is a use of the cache's one step verb: a window goes
into an empty slot and the logits come back at the positions being scored only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.cache import Append
from gpt2onnx.runtime.params import MAX_LOGPROBS
from gpt2onnx.runtime.sampling import log_softmax, top_ids

if TYPE_CHECKING:
    from gpt2onnx.runtime.model import Model


@dataclass
class ScoreResult:
    """Per-token log-probabilities of a text (natural log)."""

    token_ids: list[int]
    logprobs: list[float | None]  # None for the first token: nothing to condition on
    top_logprobs: list[tuple[tuple[int, float], ...] | None] = field(default_factory=list)

    @property
    def scored(self) -> int:
        """How many tokens have a log-prob (all but the first)."""
        return max(0, len(self.token_ids) - 1)

    @property
    def total_logprob(self) -> float:
        return float(sum(lp for lp in self.logprobs if lp is not None))

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-likelihood over the scored tokens."""
        return math.exp(-self.total_logprob / self.scored) if self.scored else float("nan")


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over n tokens; every index in
    [1, n) is scored exactly once (the transformers perplexity guide's schedule)."""
    out = []
    scored_to = 1  # index 0 has no context
    begin = 0
    while scored_to < n:
        end = min(begin + window, n)
        out.append((begin, end, scored_to))
        scored_to = end
        begin += stride
    return out


def score_ids(model: Model, ids: Sequence[int], top_logprobs: int = 0,
              window: int | None = None, stride: int | None = None,
              progress: Callable[[int], None] | None = None) -> ScoreResult:
    """Log-prob of every token of ``ids`` given the ones before it.

    Args:
        window: tokens per window (default and maximum: the model's context).
        stride: tokens between window starts (default: half the window).
        top_logprobs: also report the N most likely tokens at each scored position.
        progress: called with the number of tokens scored by each window.
    """
    context = model.context_length
    window = context if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= context:
        raise InvalidParameterError("window", f"window must be an integer in [2, {context}] "
                                    f"(the model's context), got {window!r}.")
    stride = max(1, window // 2) if stride is None else stride
    # A window must start before the first token it scores (that token needs context).
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < window:
        raise InvalidParameterError("stride", f"stride must be an integer in [1, {window - 1}] "
                                    f"(less than the window), got {stride!r}.")
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) \
            or not 0 <= top_logprobs <= MAX_LOGPROBS:
        raise InvalidParameterError("top_logprobs", f"top_logprobs must be an integer in "
                                    f"[0, {MAX_LOGPROBS}], got {top_logprobs!r}.")
    if not model.manifest.any_logits:
        raise InvalidParameterError("model", model.manifest.last_position_only("scoring"))
    ids = [int(t) for t in ids]
    vocab = model.manifest.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if not ids or bad:
        raise InvalidParameterError(
            "text", "the text is empty; give at least one token." if not ids else
            f"token id {bad[0]} is outside the vocabulary [0, {vocab - 1}].")
    result = ScoreResult(list(ids), [None], [None])
    cache = model.cache(1)
    try:
        for begin, end, first in windows(len(ids), window, stride):
            cache.reset()
            # Logits at positions first-1 .. end-2 predict tokens first .. end-1.
            keep = end - first + 1
            step = cache.step([Append(0, ids[begin:end], keep)])
            logits = step.logits(0)[:-1]  # [end - first, vocab]
            logp = log_softmax(logits.astype(np.float32, copy=False))
            targets = np.asarray(ids[first:end], np.int64)
            result.logprobs.extend(logp[np.arange(len(targets)), targets].tolist())
            if top_logprobs:
                top = top_ids(logp, top_logprobs)
                vals = np.take_along_axis(logp, top, axis=-1)
                result.top_logprobs.extend(
                    tuple(zip(t.tolist(), v.tolist(), strict=True)) for t, v in zip(top, vals,
                                                                                    strict=True))
            else:
                result.top_logprobs.extend(() for _ in range(len(targets)))
            if progress is not None:
                progress(end - first)
    finally:
        model._return_cache(cache)
    return result
