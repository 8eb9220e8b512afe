"""The scheduler: which rows get a cache slot, and how many prompt tokens run, this step.

Pure bookkeeping, no model and no threads (the engine loop asks it once per step and
tells it what happened). As in vLLM's scheduler there is no prefill phase and decode
phase: every row simply has prompt tokens still to run (``left``) or is decoding, and a
step's work is one decode token for every decoding row plus prompt chunks that fit the
step's token budget:

- while any row decodes, a step runs at most ``chunk_tokens`` prompt tokens, so a
  decoding row never waits for more than one chunk between its tokens;
- with nothing decoding nobody waits, and a step runs up to ``idle_tokens``.

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

    def plan(self) -> StepPlan:
        """The prompt chunks of this step: the prefilling rows oldest first, each as much
        of its prompt as the budget has left. Rows with nothing left to run (they copy an
        identical prompt's slot) get no chunk."""
        decoding = len(self.running)
        if not self.joinable:  # whole prompts, in the batch's first run
            return StepPlan([(s, s.left) for s in self.prefilling if s.left], decoding,
                            sum(s.left for s in self.prefilling))
        budget = self.chunk_tokens if decoding else self.idle_tokens
        left = budget
        chunks: list[tuple[SeqState, int]] = []
        for seq in self.prefilling:
            if left <= 0:
                break
            if seq.left <= 0:
                continue
            n = min(seq.left, left)
            chunks.append((seq, n))
            left -= n
        return StepPlan(chunks, decoding, budget + decoding)

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
