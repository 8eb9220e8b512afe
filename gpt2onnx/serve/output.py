"""Output delivery: what the rows of a request produced since the last step goes to its
caller as ``ChoiceDelta`` lists (text safe to show, new ids, log-probs, finish reasons),
finished rows leave the batch, and the request's latencies and outcome are counted.

Stopping (EOS, stop strings, max tokens) is decided where tokens are taken, in the
``Generator``; this module only reads rows and hands their news on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpt2onnx.serve.completion import ChoiceDelta, EngineRequest
from gpt2onnx.serve.metrics import ServeMetrics
from gpt2onnx.serve.streams import DONE, Push

if TYPE_CHECKING:
    from gpt2onnx.runtime.generator import Generator
    from gpt2onnx.serve.engine import Engine
    from gpt2onnx.serve.scheduler import SeqState


class Ticket:
    """A submitted request's place in the engine. ``push`` receives, in order, lists of
    ``ChoiceDelta`` and then exactly one of ``DONE`` or an exception."""

    def __init__(self, engine: Engine, request: EngineRequest, push: Push) -> None:
        self._engine = engine
        self.request = request
        self.push = push
        self.submitted = time.perf_counter()
        timeout = engine.config.request_timeout
        self.deadline = self.submitted + timeout if timeout is not None else math.inf
        self.cancelled = False  # set by any thread, read by the engine at step boundaries
        self.finished = False
        n = len(request.rows)
        self.prompt_tokens = sum(len(r.prompt_ids) for r in request.rows)
        # Engine-thread state, one entry per row (choice).
        self.seqs: list[SeqState] = []  # the rows as the scheduler sees them
        self.slots: list[int | None] = [None] * n  # the cache slot while the row holds one
        self.done = [False] * n
        self.sent = [0] * n  # tokens already handed to the caller
        self.first_token_at: list[float | None] = [None] * n

    def cancel(self) -> None:
        """Give up on the request: its slots are freed at the next step boundary."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self._engine._withdraw(self)


class OutputProcessor:
    """Hands each request its rows' news after a step and counts what it sees."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self.metrics = metrics

    def emit(self, ticket: Ticket, gen: Generator,
             leave: Callable[[Ticket, int, int], None]) -> bool:
        """Push what ``ticket``'s rows produced since the last call; ``leave(ticket,
        index, slot)`` takes each finished row out of the batch. Returns whether every
        row of the request is done (its final ``DONE`` is pushed then)."""
        now = time.perf_counter()
        deltas: list[ChoiceDelta] = []
        for index, slot in enumerate(ticket.slots):
            if slot is None:
                continue
            row = gen.rows[slot]
            if row is None or not (row.token_ids or row.done):
                continue  # still prefilling
            start = ticket.sent[index]
            new = row.token_ids[start:]
            if not new and not row.done:
                continue
            first = ticket.first_token_at[index]
            deltas.append(ChoiceDelta(index, gen.stream_text(slot), list(new),
                                      row.logprobs[start:], row.finish_reason,
                                      row.prompt_logprobs if first is None else None))
            ticket.sent[index] = len(row.token_ids)
            self.metrics.generation_tokens.inc(len(new))
            if first is None:
                ticket.first_token_at[index] = first = now
                self.metrics.time_to_first_token.observe(now - ticket.submitted)
            if row.done:
                if len(row.token_ids) > 1:
                    self.metrics.time_per_output_token.observe(
                        (now - first) / (len(row.token_ids) - 1))
                ticket.done[index] = True
                ticket.slots[index] = None
                leave(ticket, index, slot)
        if deltas:
            self.push(ticket, deltas)
        if all(ticket.done):
            self.finish(ticket, DONE, "success")
            return True
        return False

    def finish(self, ticket: Ticket, last: Any, outcome: str) -> None:
        """The ticket's final push (DONE or an error; nothing for a cancellation)."""
        if ticket.finished:
            return
        ticket.finished = True
        self.metrics.outcome(outcome)
        if isinstance(last, BaseException):
            last.counted = True  # type: ignore[attr-defined]  # not again by the HTTP layer
        if last is not None:
            self.push(ticket, last)

    def push(self, ticket: Ticket, item: Any) -> None:
        try:
            ticket.push(item)
        except RuntimeError:  # the caller's event loop is gone: nobody reads this any more
            ticket.cancelled = True
