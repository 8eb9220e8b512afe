"""Speculative decoding: verify k drafted tokens in one target step, keep what the target
would have produced itself.

A verification appends the row's next input plus its k draft tokens to the target's cache
in one step and reads the logits at those k+1 positions. Position j holds the target's
distribution after the j first drafts, so:

* greedy: drafts are accepted while each equals the target's argmax, and the target's own
  token at the first mismatch (or after the last draft) comes for free. The output is the
  output without speculation, token for token.
* sampled: draft token x drawn from q is accepted with probability min(1, p(x) / q(x));
  on a rejection the token is drawn from the residual max(0, p - q), renormalised; after
  k acceptances the bonus token is drawn from p. The output then follows the target's own
  distribution p (Leviathan et al. 2023, Chen et al. 2023). A deterministic draft (prompt
  lookup) is q = all mass on its token: accept with probability p(x), else draw from p with
  x removed.

Rejected drafts are forgotten by rewinding the slot (setting its length). How many tokens
to draft adapts per row (``DraftLength``), so that a row whose drafts keep failing stops
paying for them, and so that a greedy row whose drafts are accepted but cost more time
than they save (a draft model nearly as slow as the target) stops too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.params import MAX_DRAFT_TOKENS
from gpt2onnx.runtime.sampling import sample_rows

# A row whose drafts were mostly rejected this many rounds in a row pauses speculation.
_MISSES_BEFORE_PAUSE = 2
# Plain steps of a pause; each further pause doubles it, up to the maximum.
_PAUSE_STEPS = 8
_MAX_PAUSE_STEPS = 256


def check_draft_tokens(value: object, name: str = "num_draft_tokens") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DRAFT_TOKENS:
        raise InvalidParameterError(
            name, f"{name} must be an integer in [1, {MAX_DRAFT_TOKENS}], got {value!r}; "
            "4 to 8 suit most drafts.")
    return value


def check_speculative_max_batch(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidParameterError(
            "speculative_max_batch", "speculative_max_batch must be an integer >= 0 (0: "
            f"never speculate), got {value!r}.")
    return value


class DraftLength:
    """How many tokens to draft for one row: starts at 2, doubles after a fully accepted
    draft (up to k_max), drops to just past the accepted ones after a rejection, and
    pauses (plain decoding) after two rounds in a row that did not pay, for a number of
    steps that doubles until a round pays again. A round does not pay when it kept less
    than half its draft, or (``slower``, greedy rows only, see ``Generator``) when its
    wall time per token produced exceeded a plain step's. Starting small bounds what a
    draft that never agrees costs before it is found out (measured with an unrelated draft
    model: 0.90x plain when starting at k_max = 8)."""

    def __init__(self, k_max: int) -> None:
        self.k_max = k_max
        self.k = min(2, k_max)
        self.misses = 0
        self.pause = 0  # plain steps left
        self.next_pause = _PAUSE_STEPS

    def wanted(self) -> int:
        """Tokens to draft this step (0: decode plainly)."""
        if self.pause:
            self.pause -= 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int, slower: bool = False) -> None:
        if proposed == 0:
            return
        if accepted == proposed:
            self.k = min(self.k_max, 2 * self.k)
        else:
            self.k = max(1, min(self.k - 1, accepted + 1))
        if 2 * accepted >= proposed and not slower:  # a round that paid: start over
            self.misses = 0
            self.next_pause = _PAUSE_STEPS
            return
        # Less than half kept counts as a miss: a draft right one time in ten (measured
        # with an unrelated draft model) must not keep the row drafting.
        self.misses += 1
        if self.misses >= _MISSES_BEFORE_PAUSE:
            self.pause = self.next_pause
            self.next_pause = min(2 * self.next_pause, _MAX_PAUSE_STEPS)
            self.misses = 0


@dataclass
class SpeculationStats:
    """Counts since the generator started (the server's metrics read them)."""

    rounds: int = 0  # verification runs
    proposed: int = 0  # draft tokens checked
    accepted: int = 0  # draft tokens kept
    emitted: int = 0  # tokens produced by verification runs (accepted + the target's own)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"rounds": self.rounds, "proposed": self.proposed, "accepted": self.accepted,
                "emitted": self.emitted, "acceptance_rate": self.acceptance_rate,
                "tokens_per_round": self.tokens_per_round}


def accept_sampled(drafts: np.ndarray, q: np.ndarray | None,
                   p_at: Callable[[int], np.ndarray], draw: Callable[[], float],
                   take: Callable[[int], bool]) -> int:
    """The acceptance rule for one sampled row.

    Args:
        drafts: [k] draft tokens.
        q: [k, vocab] the distributions they were drawn from, or None (deterministic).
        p_at: p_at(j) -> [vocab] the target's distribution at position j, given the
            tokens taken so far (called in order, after ``take`` of the previous token).
        draw: the row's next uniform in [0, 1).
        take: take(token) emits a token; returns False when the row has finished.

    Returns:
        How many draft tokens were accepted.
    """
    for j, x in enumerate(drafts.tolist()):
        p = p_at(j)
        qx = 1.0 if q is None else float(q[j, x])
        if draw() * qx < p[x]:  # accept with probability min(1, p(x) / q(x))
            if not take(x):
                return j + 1
            continue
        if q is None:
            residual = p.astype(np.float64)
            residual[x] = 0.0
        else:
            residual = np.maximum(p.astype(np.float64) - q[j], 0.0)
        take(inverse_cdf(residual if residual.sum() > 0 else p, draw()))
        return j
    take(inverse_cdf(p_at(len(drafts)), draw()))
    return len(drafts)


def accept_greedy(drafts: Sequence[int], target: Sequence[int]) -> int:
    """How many drafts equal the target's picks at their positions, from the start."""
    n = 0
    for d, t in zip(drafts, target, strict=False):
        if d != t:
            break
        n += 1
    return n


def inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The first id whose cumulative weight exceeds u * total (ids ascending): the
    sampler's own inverse CDF, for one row."""
    return int(sample_rows(weights[None], np.array([u]))[0])
