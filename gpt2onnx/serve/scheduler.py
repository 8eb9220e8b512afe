"""The scheduler: which rows get a cache slot, and how many prompt tokens run, this step.

Pure bookkeeping, no model and no threads (the engine loop asks it once per step and
tells it what happened). As in vLLM's scheduler there is no prefill phase and decode
phase: every row simply has prompt tokens still to run (``left``) or is decoding, and a
step's work is one decode token for every decoding row plus prompt chunks that fit the
step's token budget:

- while any row decodes, a step runs at most ``chunk_tokens`` prompt tokens, so a
  decoding row never waits for more than one chunk between its tokens; a ``StallBudget``
  may lower that per step, from measured run times, so that a step with a chunk takes at
  most a set multiple of a plain decode step;
- with nothing decoding, the oldest request's prompts run up to ``idle_tokens`` (a long
  prompt arriving at an idle engine runs whole); a later request's prompts get only what
  the step leaves of one chunk, so a burst of requests is spread over steps as if rows
  decoded: the first request's first token comes after its own prefill (and at most
  one chunk of others'), not after the whole burst's. Requests whose rows end at their
  first token (scoring) all share the idle step, as many prompts per run as fit.

Fairness: rows get slots in arrival order (a row never overtakes an older one for a
slot), and chunks go to the prefilling rows oldest first, so the oldest request always
progresses and a long prompt is never starved by short ones. A request's rows are queued
one by one: a request with more rows than free slots starts those it can and the rest
follow as slots free up.

A cache whose rows cannot join a running batch (the standard layout: one tensor for the
whole batch) is a property the scheduler respects: it admits rows only into an empty
batch, and their prompts run whole.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gpt2onnx.errors import InvalidParameterError


@dataclass(eq=False)
class SeqState:
    """One row (an OpenAI choice) as the scheduler sees it."""

    owner: Hashable  # the request it belongs to
    index: int  # the row's place in its request
    prompt_tokens: int
    slot: int | None = None
    left: int = 0  # prompt tokens still to run once admitted (set by the engine)
    decodes: bool = True  # goes on after its first token (False: max_tokens 0 or 1, scoring)
    payload: Any = field(default=None, repr=False)  # the engine's own data for the row


@dataclass
class StepPlan:
    """One step's work: prompt chunks (row, tokens) and how many rows decode."""

    chunks: list[tuple[SeqState, int]]
    decode_rows: int
    budget: int  # tokens the step could take

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_rows


def _check(name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameterError(name, f"{name} must be an integer >= {low}, got "
                                    f"{value!r}.")
    return value


class Scheduler:
    """Turns the waiting queue, the prefilling rows and a token budget into a step.

    Args:
        slots: cache rows (the most rows decoding or prefilling at once).
        chunk_tokens: prompt tokens per step while rows decode.
        idle_tokens: prompt tokens per step while none decode.
        joinable: whether rows can join a running batch (fused cache slots).
    """

    def __init__(self, slots: int, chunk_tokens: int = 256, idle_tokens: int = 2048,
                 joinable: bool = True) -> None:
        self.slots = _check("max_batch_size", slots)
        self.chunk_tokens = _check("prefill_chunk", chunk_tokens)
        self.idle_tokens = max(_check("max_step_tokens", idle_tokens), chunk_tokens)
        self.joinable = joinable
        self.waiting: deque[SeqState] = deque()
        self.prefilling: list[SeqState] = []  # admitted, prompt not wholly in the cache
        self.running: list[SeqState] = []  # decoding

    # ---- the queue ----------------------------------------------------------------------

    def enqueue(self, seqs: Iterable[SeqState]) -> None:
        self.waiting.extend(seqs)

    @property
    def occupied(self) -> int:
        return len(self.prefilling) + len(self.running)

    def admit(self, free_slots: Iterable[int]) -> list[SeqState]:
        """Rows that take a slot now, oldest first, one per free slot. Without joinable
        rows, only into an empty batch."""
        free = list(free_slots)
        if not self.joinable and self.occupied:
            return []
        taken: list[SeqState] = []
        while self.waiting and free:
            seq = self.waiting.popleft()
            seq.slot = free.pop(0)
            taken.append(seq)
        self.prefilling += taken
        return taken

    # ---- one step -----------------------------------------------------------------------

    def plan(self, chunk_limit: int | None = None) -> StepPlan:
        """The prompt chunks of this step: the prefilling rows oldest first, each as much
        of its prompt as the budget has left; while rows decode, a later prompt that the
        budget could take whole in one step is not split but waits for the next step.
        With nothing decoding, the oldest request's prompts share ``idle_tokens`` and a
        later request's prompts only what the step leaves of one chunk, unless none of
        the oldest request's rows decodes past its first token. Rows with
        nothing left to run (they copy an identical prompt's slot) get no chunk.
        ``chunk_limit`` lowers the budget of a step with decoding rows (a
        ``StallBudget``'s ``tokens()``)."""
        decoding = len(self.running)
        if not self.joinable:  # whole prompts, in the batch's first run
            return StepPlan([(s, s.left) for s in self.prefilling if s.left], decoding,
                            sum(s.left for s in self.prefilling))
        budget = self.chunk_tokens if decoding else self.idle_tokens
        if decoding and chunk_limit is not None:
            budget = max(1, min(budget, chunk_limit))
        # With nothing decoding nobody waits for the step but the oldest request: a later
        # request's prompt in it would delay that request's first token by its own
        # prefill, so it gets what is left of one chunk, as if rows decoded (measured in
        # docs/serving.md: a closed loop's burst then spreads over steps, and its clients
        # stop arriving in lockstep). The oldest request's rows all finish together
        # anyway (an lm-eval batch of 16 prompts is one request) and share the step.
        lead = None if decoding else self._idle_lead()
        left, used = budget, 0
        chunks: list[tuple[SeqState, int]] = []
        for seq in self.prefilling:
            if seq.left <= 0:
                continue
            held = bool(decoding) or (lead is not None and seq.owner is not lead)
            whole = budget if decoding else self.chunk_tokens  # what a held step takes
            if held and not decoding:
                left = min(left, self.chunk_tokens - used)
            if left <= 0:
                break
            if held and chunks and left < seq.left <= whole:
                # A prompt that one step can take whole waits for the next step instead of
                # being split: its first token comes in that step either way, and its
                # second piece would start on a past, which runs apart from the new
                # prompts' lane (one more pass over the weights for every decoding row).
                break
            n = min(seq.left, left)
            chunks.append((seq, n))
            left -= n
            used += n
        # An idle step that holds later requests back still reports the idle budget: its
        # budget-used metric then reads low, which is what it is (the step ran short).
        return StepPlan(chunks, decoding, budget + decoding)

    def _idle_lead(self) -> Hashable | None:
        """The request an idle step is for: the oldest with prompt tokens left, or None
        where its rows end at their first token (scoring, as lm-eval's concurrent
        loglikelihood requests): they leave no stream waiting and no lockstep behind, so
        every request shares the idle step, as many prompts per run as fit."""
        first = next((s for s in self.prefilling if s.left > 0), None)
        if first is None:
            return None
        rows = (s for s in self.prefilling if s.owner is first.owner)
        return first.owner if any(s.decodes for s in rows) else None

    def ran(self, plan: StepPlan) -> None:
        """The plan's chunks are in the cache."""
        for seq, n in plan.chunks:
            seq.left -= n

    def started(self, seq: SeqState) -> None:
        """A prefilling row has its first token and decodes from the next step."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            self.running.append(seq)

    def finished(self, seq: SeqState) -> None:
        """A row left the batch (done, cancelled or failed): its slot is free."""
        for group in (self.prefilling, self.running):
            if seq in group:
                group.remove(seq)

    def drop(self, owner: Hashable) -> list[SeqState]:
        """Forget every row of ``owner`` (a cancelled or failed request); returns those
        that held slots."""
        self.waiting = deque(s for s in self.waiting if s.owner is not owner)
        held = [s for s in self.prefilling + self.running if s.owner is owner]
        for s in held:
            self.finished(s)
        return held

    def clear(self) -> list[SeqState]:
        """Forget everything; returns the rows that held slots."""
        held = self.prefilling + self.running
        self.waiting.clear()
        self.prefilling, self.running = [], []
        return held


class StallBudget:
    """How many prompt tokens a step may run while rows decode, so that the step takes at
    most ``ratio`` times a plain decode step: a decoding row's gap between two tokens
    stays within ``ratio`` times its usual gap.

    Prompt chunks and decode tokens are separate model runs on the CPU (see the engine),
    so a chunk of n tokens costs a + b*n: a fixed part (one more pass over the weights,
    about half a decode step of 15 gpt2 rows on a 2-core CPU) and a part per token. The
    budget fits a and b to the chunk runs it is shown (exponentially weighted least
    squares, so it follows a changing load) and d, the decode step, to the decode runs,
    and allows the largest n with a + b*n <= (ratio - 1) * d, kept within [low, high]:
    ``low`` keeps prefill moving where even one token costs more than the stall allowed.
    """

    def __init__(self, ratio: float, low: int, high: int, decay: float = 0.9) -> None:
        if not (isinstance(ratio, (int, float)) and 1.0 < ratio < 1e6):
            raise InvalidParameterError("max_stall", f"max_stall must be a ratio above 1 "
                                        f"(2 = a step with prompt chunks takes at most two "
                                        f"decode steps), got {ratio!r}.")
        self.ratio = float(ratio)
        self.low, self.high = _check("prefill_chunk_min", low), _check("prefill_chunk", high)
        self.low = min(self.low, self.high)
        self.decay = decay
        self.decode_s: float | None = None  # EMA of a plain decode step
        # Weighted sums for the fit of chunk seconds = a + b * tokens.
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    def decode(self, seconds: float) -> None:
        """A decode run took ``seconds``."""
        d = self.decode_s
        self.decode_s = seconds if d is None else self.decay * d + (1 - self.decay) * seconds

    def chunk(self, tokens: int, seconds: float) -> None:
        """A prefill run of ``tokens`` prompt tokens took ``seconds``."""
        k = self.decay
        self._w = k * self._w + 1
        self._n = k * self._n + tokens
        self._t = k * self._t + seconds
        self._nn = k * self._nn + tokens * tokens
        self._nt = k * self._nt + tokens * seconds

    def cost(self) -> tuple[float, float] | None:
        """The fitted (a, b), or None before any chunk ran."""
        if self._w == 0:
            return None
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var = self._nn / self._w - mean_n * mean_n
        if var <= 1e-9 * max(1.0, mean_n * mean_n):  # one chunk size seen: all of it per token
            return 0.0, mean_t / max(mean_n, 1.0)
        b = max((self._nt / self._w - mean_n * mean_t) / var, 0.0)
        return max(mean_t - b * mean_n, 0.0), b

    def tokens(self) -> int:
        """This step's prompt-token limit."""
        fit = self.cost()
        if self.decode_s is None or fit is None:
            return self.high  # nothing measured yet: the configured chunk
        a, b = fit
        room = (self.ratio - 1.0) * self.decode_s - a
        if b <= 0:
            return self.high if room > 0 else self.low
        return int(min(self.high, max(self.low, room / b)))
