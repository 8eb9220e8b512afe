"""The serving engine: one thread owns the model (session, IOBinding, KV buffers) and
drives one ``Generator``; other threads and asyncio loops submit requests and read their
output step by step, and never wait on a model run.

One round of the engine thread (continuous batching):
  1. retire running requests that were cancelled (client gone) or passed their deadline:
     their slots are free at once;
  2. admit queued requests into free slots: prefill their prompts into their slots (rows
     in adjacent slots share one run) and pick each row's first token; requests that
     arrived during that prefill follow at once; running rows wait for these prefills, of
     at most ``prefill_budget`` prompt tokens in all (the oldest request always goes in);
  3. run one decode step over every running row and hand each request its new output.

A standard-layout folder holds one cache tensor for the whole batch, so rows cannot join
or leave it: the engine then runs one request (its ``n`` rows) at a time, and logs so.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2onnx.contract import LAYOUT_FUSED
from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.drafting import NGRAM, check_draft, draft_spinning
from gpt2onnx.runtime.generator import Generator, plan_row
from gpt2onnx.runtime.model import Model
from gpt2onnx.runtime.params import GenerationParams
from gpt2onnx.runtime.speculative import (
    SpeculationStats,
    check_draft_tokens,
    check_speculative_max_batch,
)
from gpt2onnx.serve.completion import ChoiceDelta, Completion, EngineRequest
from gpt2onnx.serve.errors import (
    ModelRunError,
    NotReadyError,
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
)
from gpt2onnx.serve.metrics import ServeMetrics
from gpt2onnx.serve.streams import DONE, AsyncStream, Push, SyncStream

log = logging.getLogger("gpt2onnx.serve")

# Prompt length of the warm-up passes: about a chat turn, so the arena is sized for the
# prompts a server mostly sees (a longer one still grows it once, on first use).
WARMUP_PROMPT_TOKENS = 32


@dataclass(frozen=True)
class EngineConfig:
    """How much the engine takes on.

    Args:
        max_batch_size: cache slots, i.e. rows decoded together in one step.
        max_queue: requests that may wait while every slot is busy; the next is refused
            with ``QueueFullError`` (HTTP 429).
        request_timeout: seconds from submission until a request fails with
            ``RequestTimeoutError`` (HTTP 504); None waits forever.
        max_choices: rows one request may ask for (OpenAI's ``n`` times its prompts).
        prefill_budget: prompt tokens prefilled at one step boundary while other rows are
            running (the first queued request is always admitted): bounds their wait.
        warmup: run a short generation before reporting ready.
        speculative: None, "ngram" (prompt lookup) or "draft:FOLDER" (a draft model folder
            with the model's tokenizer): speculative decoding while at most
            ``speculative_max_batch`` rows run (on the CPU each speculating row verifies
            in a run of its own, which stops paying above a batch of one or two).
        num_draft_tokens: draft tokens checked per row and step at most, in [1, 16].
    """

    max_batch_size: int = 16
    max_queue: int = 256
    request_timeout: float | None = 600.0
    max_choices: int = 8
    prefill_budget: int = 512
    warmup: bool = True
    speculative: str | None = None
    num_draft_tokens: int = 8
    speculative_max_batch: int = 2

    def __post_init__(self) -> None:
        check_draft_tokens(self.num_draft_tokens)
        s = self.speculative
        if s is not None and s != NGRAM and not (isinstance(s, str) and s.startswith("draft:")
                                                 and len(s) > len("draft:")):
            raise InvalidParameterError(
                "speculative", f"speculative must be 'ngram' or 'draft:FOLDER', got {s!r}.")
        check_speculative_max_batch(self.speculative_max_batch)
        for name in ("max_batch_size", "max_choices", "prefill_budget", "max_queue"):
            value = getattr(self, name)
            low = 0 if name == "max_queue" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidParameterError(name, f"{name} must be an integer >= {low}, "
                                            f"got {value!r}.")
        t = self.request_timeout
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise InvalidParameterError("request_timeout", "request_timeout must be a positive "
                                        f"number of seconds or None, got {t!r}.")


@dataclass(frozen=True)
class EngineStats:
    waiting: int  # requests queued for a slot
    running: int  # requests with rows in the batch
    running_rows: int
    free_slots: int


def check_choices(n: int, limit: int, param: str = "n") -> None:
    """The one check of how many rows a request may ask for (the HTTP ``n`` uses it too)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise InvalidParameterError(param, f"{param} must be an integer in [1, {limit}] "
                                    f"(choices per request on this server), got {n!r}.")


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
        # Engine-thread state, one entry per row (choice).
        n = len(request.rows)
        self.slots: list[int | None] = []  # None once the row finished and left its slot
        self.sent = [0] * n  # tokens already handed to the caller
        self.first_token_at: list[float | None] = [None] * n

    def cancel(self) -> None:
        """Give up on the request: its slots are freed at the next step boundary."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self._engine._withdraw(self)


class Engine:
    """Continuous batching over one model, on a thread of its own.

    Args:
        model: a loaded ``Model``, or a function that loads one (called on the engine
            thread, so ``/health`` can answer while a large folder loads).
        config: batch size, queue and timeout limits.
        metrics: where to count requests and latencies (default: a fresh registry).

    Python use, without HTTP::

        with Engine(lambda: Model("out/gpt2")) as engine:
            request = engine.request("Hello", GenerationParams(max_new_tokens=20))
            print(engine.complete_sync(request).choices[0].text)
            # or: async for deltas in engine.stream(request): ...
    """

    def __init__(self, model: Model | Callable[[], Model], config: EngineConfig | None = None,
                 metrics: ServeMetrics | None = None) -> None:
        self.config = config if config is not None else EngineConfig()
        self.metrics = metrics if metrics is not None else ServeMetrics()
        self._source = model
        self._model: Model | None = None
        self._gen: Generator | None = None
        self._draft: object = None  # "ngram" or a draft Model, with --speculative
        self._spec_seen = SpeculationStats()  # the generator's counters already exported
        self._continuous = True
        self._wake = threading.Condition()
        self._waiting: deque[Ticket] = deque()  # guarded by _wake
        self._running: list[Ticket] = []  # engine thread only
        self._rows_running = 0
        self._stopping = False
        self._drain_deadline = math.inf
        self._ready = threading.Event()
        self._settled = threading.Event()  # loaded, or failed to
        self.load_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> Engine:
        """Start the engine thread (it loads and warms the model); returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="gpt2onnx-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the model is loaded and warm; re-raises a load failure."""
        self._settled.wait(timeout)
        if self.load_error is not None:
            raise self.load_error
        return self._ready.is_set()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let queued and running ones finish for up to
        ``drain_timeout`` seconds, then fail the rest with ``ShuttingDownError``."""
        with self._wake:
            self._stopping = True
            self._drain_deadline = time.perf_counter() + drain_timeout
            self._wake.notify()
        if self._thread is None:
            self._fail_leftovers()
        elif self._thread is not threading.current_thread():
            self._thread.join(drain_timeout + 10)  # the thread fails what is left, then exits

    def __enter__(self) -> Engine:
        self.start().wait_ready()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def status(self) -> str:
        """"loading", "ready", "failed" or "stopping"."""
        if self.load_error is not None:
            return "failed"
        if self._stopping:
            return "stopping"
        return "ready" if self._ready.is_set() else "loading"

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def model(self) -> Model:
        """The loaded model (its tokenizer and manifest are safe to read from any thread)."""
        if self._model is None or not self._ready.is_set():
            raise NotReadyError("the model is still loading; retry when GET /health says ok.")
        return self._model

    @property
    def continuous_batching(self) -> bool:
        return self._continuous

    @property
    def max_choices(self) -> int:
        """Rows one request may have: with slots, no more than the batch holds."""
        c = self.config
        return min(c.max_choices, c.max_batch_size) if self._continuous else c.max_choices

    def stats(self) -> EngineStats:
        with self._wake:
            waiting = len(self._waiting)
        return EngineStats(waiting, len(self._running), self._rows_running, self._free_rows())

    # ---- submitting ----------------------------------------------------------------------

    def request(self, prompt: str | Sequence[int], params: GenerationParams | None = None,
                n: int = 1) -> EngineRequest:
        """An ``EngineRequest`` for one prompt (text or token ids) and ``n`` choices."""
        model = self.model
        ids = model.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return EngineRequest.of(ids, params if params is not None else GenerationParams(), n)

    def submit(self, request: EngineRequest, push: Push) -> Ticket:
        """Queue a request; ``push`` is called on the engine thread with its output (see
        ``Ticket``). Thread-safe. ``stream``/``complete`` are the friendlier verbs.

        Raises:
            InvalidParameterError: a prompt or parameter the model cannot run.
            QueueFullError: ``max_queue`` requests are already waiting.
            NotReadyError / ShuttingDownError: not loaded yet, or stopping.
        """
        try:
            self._validate(request)
            ticket = Ticket(self, request, push)
            with self._wake:
                if self._stopping:
                    raise ShuttingDownError("the server is shutting down; retry elsewhere.")
                if len(self._waiting) >= self.config.max_queue + self._free_rows():
                    raise QueueFullError(
                        f"the server is at capacity ({self.config.max_batch_size} running, "
                        f"{len(self._waiting)} queued); retry after a moment.")
                self._waiting.append(ticket)
                self.metrics.queue_depth.set(len(self._waiting))
                self._wake.notify()
        except (QueueFullError, NotReadyError, ShuttingDownError) as exc:
            self.metrics.outcome(exc.outcome)
            raise
        except InvalidParameterError:
            self.metrics.outcome("bad_request")
            raise
        return ticket

    def stream(self, request: EngineRequest) -> AsyncStream:
        """Submit now; iterate asynchronously over the output (see ``AsyncStream``)."""
        return AsyncStream(self.submit, request)

    def stream_sync(self, request: EngineRequest) -> SyncStream:
        """Submit now; iterate, blocking, over the output (see ``SyncStream``)."""
        return SyncStream(self.submit, request)

    async def complete(self, request: EngineRequest) -> Completion:
        """Run a request to the end (cancelled if the awaiting task is)."""
        completion = Completion(request)
        async with self.stream(request) as stream:
            async for deltas in stream:
                completion.add(deltas)
        return completion

    def complete_sync(self, request: EngineRequest) -> Completion:
        completion = Completion(request)
        with self.stream_sync(request) as stream:
            for deltas in stream:
                completion.add(deltas)
        return completion

    def _validate(self, request: EngineRequest) -> None:
        model = self.model
        check_choices(len(request.rows), self.max_choices)
        for row in request.rows:
            plan_row(row.prompt_ids, row.params, model.context_length,
                     model.manifest.vocab_size)

    def _withdraw(self, ticket: Ticket) -> None:
        """A ticket was cancelled: drop it now if still queued, else wake the engine."""
        with self._wake:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self.metrics.queue_depth.set(len(self._waiting))
                self._finish(ticket, None, "cancelled")
            self._wake.notify()

    def _free_rows(self) -> int:
        if self._continuous:
            return self.config.max_batch_size - self._rows_running
        return 0 if self._running else self.config.max_choices

    # ---- the engine thread ---------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._load()
        except BaseException as exc:
            self.load_error = exc
            log.error("could not load the model: %s", exc)
            self._settled.set()
            return
        self._ready.set()
        self._settled.set()
        log.info("engine ready: %s, %s", self._model.folder if self._model else "?",
                 f"continuous batching over {self.config.max_batch_size} slots"
                 if self._continuous else "one request at a time")
        try:
            while self._round():
                pass
        except BaseException:
            log.exception("the engine thread failed; failing every request")
            raise
        finally:
            self._stopping = True
            self._fail_leftovers()

    def _load(self) -> None:
        model = self._source if isinstance(self._source, Model) else self._source()
        self._continuous = model.manifest.layout == LAYOUT_FUSED
        if not self._continuous:
            log.warning("%s has the standard layout: rows cannot join a running batch, so "
                        "requests run one at a time. Export with --layout fused for "
                        "continuous batching.", model.folder)
        spec = self.config.speculative
        if spec is not None and not self._continuous:
            raise InvalidParameterError(
                "speculative", f"--speculative needs a fused model folder; {model.folder} has "
                "the standard layout. Export with --layout fused.")
        if spec is not None and not model.manifest.any_logits:
            raise InvalidParameterError("speculative", model.manifest.last_position_only(
                "speculative decoding (logits at every drafted position)"))
        if spec is not None and spec.startswith("draft:"):
            folder = Path(spec[len("draft:"):])
            if not (folder / "manifest.json").is_file():
                raise InvalidParameterError(
                    "speculative", f"draft folder {str(folder)!r} has no manifest.json; pass "
                    "a folder written by gpt2onnx.export.")
            # Its threads leave the cores to the model's between runs (draft_spinning).
            self._draft = Model(folder, provider=model.provider,
                                spinning=draft_spinning(model))
            check_draft(self._draft, model)
        elif spec == NGRAM:
            self._draft = NGRAM
        self._model = model
        self._gen = self._new_generator()
        if self.config.warmup:
            self._warm_up()

    def _new_generator(self) -> Generator | None:
        assert self._model is not None
        if not self._continuous:
            return None  # one Generator per request, made at admission
        return self._model.generator([], GenerationParams(),
                                     batch_size=self.config.max_batch_size, draft=self._draft,
                                     num_draft_tokens=self.config.num_draft_tokens,
                                     speculative_max_batch=self.config.speculative_max_batch)

    def _warm_up(self) -> None:
        """Short generations through the path requests take, at one row and at every slot:
        the first run of a shape makes onnxruntime grow its arena, and a client should not
        wait for that (a first burst of 16 prompts waited 0.7 s more without the full-batch
        pass, against 0.1 s for the same prefill warm)."""
        assert self._model is not None
        params = GenerationParams(max_new_tokens=2, stop_on_eos=False)
        length = min(WARMUP_PROMPT_TOKENS, self._model.context_length - 2)
        vocab = self._model.manifest.vocab_size
        # Distinct prompts: identical ones would be prefilled once and copied (add_rows),
        # and the full-batch prefill shape would never run.
        prompts = [[self._model.pad_id] * (length - 1) + [i % vocab]
                   for i in range(self.config.max_batch_size)]
        if self._gen is None:
            self._model.generate(prompts[0], params)
            return
        for rows in sorted({1, self.config.max_batch_size}):
            if self._draft is not None and rows <= self.config.speculative_max_batch:
                # Enough tokens for a verification run and the draft's own runs.
                params = params.with_(max_new_tokens=min(self.config.num_draft_tokens + 3,
                                                         self._model.context_length - length))
            slots = self._gen.add_rows(prompts[:rows], [params] * rows)
            while not self._gen.is_done():
                self._gen.generate_next_token()
            for slot in slots:
                self._gen.release(slot)

    def _round(self) -> bool:
        """One step boundary and one decode step; False when the engine should exit."""
        self._retire_stale()
        self.metrics.running_batch_size.set(self._rows_running)  # before a possible idle wait
        with self._wake:
            while not (self._waiting or self._running or self._stopping):
                self._wake.wait()
            if self._stopping and (not (self._waiting or self._running)
                                   or time.perf_counter() >= self._drain_deadline):
                return False
            self._expire_waiting()
        self._admit_waiting()
        if self._gen is not None and not self._gen.is_done():
            self._step()
        self.metrics.running_batch_size.set(self._rows_running)
        return True

    def _retire_stale(self) -> None:
        now = time.perf_counter()
        for t in list(self._running):
            if t.cancelled:
                self._retire(t, None, "cancelled")
            elif now >= t.deadline:
                self._retire(t, _timeout_error(t), "timeout")

    def _expire_waiting(self) -> None:
        now = time.perf_counter()
        for t in [t for t in self._waiting if now >= t.deadline]:
            self._waiting.remove(t)
            self._finish(t, _timeout_error(t), "timeout")

    def _admit_waiting(self) -> None:
        """Prefill queued requests at this step boundary. Requests that arrive while a
        prefill runs go in right after it, in the same boundary, as long as the budget
        lasts: otherwise each would wait a whole decode step more for its first token."""
        budget = self.config.prefill_budget if self._running else math.inf
        first = True
        while True:
            with self._wake:
                if not first:  # time went by in the last prefill
                    self._expire_waiting()
                incoming, budget = self._take_admissible(budget, first)
                self.metrics.queue_depth.set(len(self._waiting))
            if not incoming:
                return
            self._admit(incoming)
            first = False
            if not self._continuous:
                return
            # Rows are running now: later passes of this boundary keep to the budget.
            budget = min(budget, self.config.prefill_budget)

    def _take_admissible(self, budget: float, first: bool) -> tuple[list[Ticket], float]:
        """Queued requests, oldest first, while their rows fit the free slots and their
        prompts the prefill ``budget`` (tokens); returns them and what is left of it. On a
        boundary's first pass the head of the queue always goes in (budget or not), so a
        long prompt or a request with many choices is not starved by small ones."""
        free = self._free_rows()
        taken: list[Ticket] = []
        while self._waiting:
            rows = self._waiting[0].request.rows
            cost = self._prefill_cost(rows)
            if len(rows) > free or ((taken or not first) and cost > budget):
                break
            taken.append(self._waiting.popleft())
            free -= len(rows)
            budget -= cost
            if not self._continuous:
                break
        return taken, budget

    def _prefill_cost(self, rows: Sequence[Any]) -> int:
        """Prompt tokens a request's rows prefill: repeated prompts (``n`` > 1) run once
        where the cache copies slots."""
        if self._gen is not None and self._gen.cache.supports_slot_copy:
            return sum(len(p) for p in {tuple(r.prompt_ids) for r in rows})
        return sum(len(r.prompt_ids) for r in rows)

    def _admit(self, tickets: list[Ticket]) -> None:
        """Prefill every row of the incoming requests into free slots (rows in adjacent
        slots share one run); each row gets its first token."""
        if not tickets:
            return
        assert self._model is not None
        specs = [spec for t in tickets for spec in t.request.rows]
        self._running += tickets
        try:
            if self._continuous:
                assert self._gen is not None
                slots = iter(self._gen.add_rows([r.prompt_ids for r in specs],
                                                [r.params for r in specs]))
                for t in tickets:
                    t.slots = [next(slots) for _ in t.request.rows]
                self._rows_running += len(specs)
            else:  # one request at a time: its rows are the whole batch
                (ticket,) = tickets
                self._gen = self._model.generator([r.prompt_ids for r in specs],
                                                  [r.params for r in specs])
                ticket.slots = list(range(len(specs)))
                self._rows_running += len(specs)
                self._gen.generate_next_token()  # the batch's prefill: every first token
        except Exception as exc:
            # Requests were validated at submit: what fails here is the model run.
            log.exception("prefill failed for %d request(s)", len(tickets))
            error = ModelRunError(f"the model run failed: {exc}")
            for t in tickets:
                self._retire(t, error, "error")
            if not self._continuous:
                self._gen = None
            return
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in specs))
        for t in tickets:
            self._emit(t)

    def _step(self) -> None:
        assert self._gen is not None
        try:
            self._gen.generate_next_token()
        except Exception as exc:
            # Every running row shared that run: fail them all, keep serving with a fresh
            # generator (the cache buffers are reused; lengths restart at 0).
            log.exception("decode step failed; failing %d request(s)", len(self._running))
            error = ModelRunError(f"the model run failed: {exc}")
            for t in list(self._running):
                self._retire(t, error, "error")
            if self._gen is not None:
                self._gen.close()  # its cache goes back to the pool for the new generator
            self._gen = self._new_generator()
            self._spec_seen = SpeculationStats()
            return
        self._count_speculation()
        for t in list(self._running):
            self._emit(t)

    def _count_speculation(self) -> None:
        gen = self._gen
        if gen is None or gen.drafter is None:
            return
        now, seen, m = gen.speculation, self._spec_seen, self.metrics
        if now.rounds == seen.rounds:
            return
        m.spec_verifications.inc(now.rounds - seen.rounds)
        m.spec_draft_tokens.inc(now.proposed - seen.proposed)
        m.spec_accepted_tokens.inc(now.accepted - seen.accepted)
        m.spec_emitted_tokens.inc(now.emitted - seen.emitted)
        self._spec_seen = SpeculationStats(now.rounds, now.proposed, now.accepted, now.emitted)

    def _emit(self, ticket: Ticket) -> None:
        """Hand a request what its rows produced since the last call; free the slots of
        rows that finished."""
        gen = self._gen
        assert gen is not None
        now = time.perf_counter()
        deltas: list[ChoiceDelta] = []
        for index, slot in enumerate(ticket.slots):
            if slot is None:
                continue
            row = gen.rows[slot]
            assert row is not None
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
                gen.release(slot)
                ticket.slots[index] = None
                self._rows_running -= 1
        if deltas:
            self._push(ticket, deltas)
        if all(s is None for s in ticket.slots):
            self._running.remove(ticket)
            self._finish(ticket, DONE, "success")

    def _retire(self, ticket: Ticket, error: BaseException | None, outcome: str) -> None:
        """Take a running request out of the batch now, freeing its slots."""
        for index, slot in enumerate(ticket.slots):
            if slot is not None and self._gen is not None:
                self._gen.release(slot)
                ticket.slots[index] = None
                self._rows_running -= 1
        if ticket in self._running:
            self._running.remove(ticket)
        self._finish(ticket, error, outcome)

    def _finish(self, ticket: Ticket, last: Any, outcome: str) -> None:
        """The ticket's final push (DONE or an error; nothing for a cancellation)."""
        if ticket.finished:
            return
        ticket.finished = True
        self.metrics.outcome(outcome)
        if last is not None:
            self._push(ticket, last)

    def _push(self, ticket: Ticket, item: Any) -> None:
        try:
            ticket.push(item)
        except RuntimeError:  # the caller's event loop is gone: nobody reads this any more
            ticket.cancelled = True

    def _fail_leftovers(self) -> None:
        """On the engine thread's way out (or when it never started)."""
        error = ShuttingDownError("the server shut down before this request finished.")
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
            self.metrics.queue_depth.set(0)
        for t in waiting + list(self._running):
            self._finish(t, error, "unavailable")
        self._running.clear()
        self._rows_running = 0
        self.metrics.running_batch_size.set(0)


def _timeout_error(ticket: Ticket) -> RequestTimeoutError:
    elapsed = time.perf_counter() - ticket.submitted
    return RequestTimeoutError(f"the request timed out after {elapsed:.1f} s; ask for fewer "
                               "tokens or retry when the server is less busy.")
