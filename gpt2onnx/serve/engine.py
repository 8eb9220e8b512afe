"""The serving engine: one thread owns the model (session, IOBinding, KV buffers) and
drives one ``Generator``; other threads and asyncio loops submit requests and read their
output step by step, and never wait on a model run.

Three parts with one job each (as vLLM's engine):
  * the scheduler (``scheduler.py``, pure): the waiting rows, the rows in the batch and a
    per-step token budget in, this step's slots and prompt chunks out;
  * this loop: per step, retire cancelled and timed-out requests, give admitted rows
    their slots (a stored prefix of their prompt is copied in at once), run the planned
    prompt chunks, then one decode step over every decoding row, and recover from a
    failed run by failing only the requests whose rows were in it;
  * output delivery (``output.py``): deltas, finished rows, latencies and outcomes.

Long prompts enter the cache in chunks between decode steps (at most ``prefill_chunk``
tokens per step while rows decode), so running streams never stall behind them. Prompt
chunks and decode tokens run as separate model runs: GroupQueryAttention takes one
new-token count per run (and several new tokens onto a past only at batch 1 on the CPU).

A standard-layout folder holds one cache tensor for the whole batch, so rows cannot join
it: the scheduler then admits rows only into an empty batch, and they run together.
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

from gpt2onnx.contract import LAYOUT_FUSED
from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.drafting import NGRAM, check_draft, draft_spinning, target_spinning
from gpt2onnx.runtime.folder import spin_from_env
from gpt2onnx.runtime.generator import Generator, plan_row
from gpt2onnx.runtime.model import Model
from gpt2onnx.runtime.params import GenerationParams
from gpt2onnx.runtime.prefix_cache import PrefixCache, PrefixCacheStats
from gpt2onnx.runtime.speculative import (
    SpeculationStats,
    check_draft_tokens,
    check_speculative_max_batch,
)
from gpt2onnx.serve.completion import Completion, EngineRequest
from gpt2onnx.serve.errors import (
    ModelRunError,
    NotReadyError,
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
)
from gpt2onnx.serve.metrics import ServeMetrics
from gpt2onnx.serve.output import OutputProcessor, Ticket
from gpt2onnx.serve.scheduler import Scheduler, SeqState, StallBudget
from gpt2onnx.serve.streams import AsyncStream, Push, SyncStream

log = logging.getLogger("gpt2onnx.serve")

# Prompt length of the warm-up passes: about a chat turn, so the arena is sized for the
# prompts a server mostly sees (a longer one still grows it once, on first use).
WARMUP_PROMPT_TOKENS = 32
# The smallest prompt chunk a step runs while rows decode (see EngineConfig.max_stall).
MIN_CHUNK = 8


@dataclass(frozen=True)
class EngineConfig:
    """How much the engine takes on.

    Args:
        max_batch_size: cache slots, i.e. rows decoded together in one step.
        max_queue: rows (choices) that may wait while every slot is busy; more are refused
            with ``QueueFullError`` (HTTP 429). A request may have up to
            ``max_queue + max_batch_size`` rows; they start as slots free up.
        max_queued_tokens: prompt tokens that may wait; more are refused (429) too.
        request_timeout: seconds from submission until a request fails with
            ``RequestTimeoutError`` (HTTP 504); None waits forever.
        max_choices: OpenAI's ``n``: rows one prompt may ask for.
        prefill_chunk: prompt tokens run per step at most while rows decode: a decoding
            row waits at most this much prefill between two of its tokens.
        max_stall: a step with prompt chunks takes at most this many plain decode steps,
            from measured run times (``scheduler.StallBudget``): the chunk shrinks below
            ``prefill_chunk`` when the batch is big enough for it to matter (down to
            ``MIN_CHUNK`` tokens, so that prefill keeps moving). None (the default): always
            ``prefill_chunk``. 1.8 met the 2x gap target for a 900-token prompt arriving
            while 15 gpt2 rows decode (1.5x against 2.4x) but cost a closed loop of 16
            clients 13 % of its throughput and tripled its TTFT p90
            (bench/results/serving.md).
        max_step_tokens: prompt tokens run per step while no row decodes, by the oldest
            request's prompts; a later request's get what the step leaves of one
            ``prefill_chunk`` (``Scheduler.plan``), unless the oldest request only scores
            (max_tokens 0 or 1: then all share it).
        prefix_cache_mb: host memory for reusable prompt blocks (prefix caching; 0 turns it
            off). CPU folders only.
        prefix_block_tokens: prefixes are matched in whole blocks of this many tokens.
        warmup: run a short generation before reporting ready.
        speculative: None, "ngram" (prompt lookup) or "draft:FOLDER" (a draft model folder
            with the model's tokenizer): speculative decoding while at most
            ``speculative_max_batch`` rows run (on the CPU each speculating row verifies
            in a run of its own, which stops paying above a batch of one or two).
        num_draft_tokens: draft tokens checked per row and step at most, in [1, 16].
        mixed_runs: load the folder's mixed graph where it has one (CPU fused folders
            exported by this version), so that a step's prompt chunks and decode tokens
            share one model run (one pass over the weights instead of two). Read by
            whoever makes the ``Model`` (the server passes it as ``Model(mixed=...)``).
    """

    max_batch_size: int = 16
    max_queue: int = 256
    max_queued_tokens: int = 1 << 20
    request_timeout: float | None = 600.0
    max_choices: int = 8
    prefill_chunk: int = 32
    max_stall: float | None = None
    max_step_tokens: int = 2048
    prefix_cache_mb: int = 256
    prefix_block_tokens: int = 16
    warmup: bool = True
    speculative: str | None = None
    num_draft_tokens: int = 8
    speculative_max_batch: int = 2
    mixed_runs: bool = True

    def __post_init__(self) -> None:
        check_draft_tokens(self.num_draft_tokens)
        s = self.speculative
        if s is not None and s != NGRAM and not (isinstance(s, str) and s.startswith("draft:")
                                                 and len(s) > len("draft:")):
            raise InvalidParameterError(
                "speculative", f"speculative must be 'ngram' or 'draft:FOLDER', got {s!r}.")
        check_speculative_max_batch(self.speculative_max_batch)
        for name in ("max_batch_size", "max_choices", "prefill_chunk", "max_step_tokens",
                     "max_queue", "max_queued_tokens", "prefix_cache_mb",
                     "prefix_block_tokens"):
            value = getattr(self, name)
            low = 0 if name in ("max_queue", "prefix_cache_mb") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidParameterError(name, f"{name} must be an integer >= {low}, "
                                            f"got {value!r}.")
        if self.max_stall is not None:
            StallBudget(self.max_stall, MIN_CHUNK, self.prefill_chunk)  # checks the ratio
        t = self.request_timeout
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise InvalidParameterError("request_timeout", "request_timeout must be a positive "
                                        f"number of seconds or None, got {t!r}.")


def server_spinning(asked: bool | str | None, speculative: str | None = None) -> bool | str:
    """Intra-op spinning for a serving process: ``asked`` (``--no-spin`` gives False), else
    GPT2ONNX_SPIN, else on; with a draft model full spinning becomes ``"run"`` (the target
    and the draft take turns on the cores, see ``session_options``).

    On stays the server's default although its cores are shared with the HTTP loop.
    Measured 2026-12-03 on the 2-core box, 16 clients in a closed loop, gpt2 fp32: in
    process, a step took 39 ms spinning against 45.5 ms sleeping (0.85x the throughput
    without spinning), while the engine before the scheduler was the same both ways;
    over HTTP spinning gave 313 against 298 tokens/s. An earlier host (2026-12-02) had
    measured the reverse, 248 against 282 (docs/serving.md, "Spinning"): ``--no-spin``
    is worth trying where the load generator or other processes share the cores.
    """
    spinning = target_spinning(asked if asked is not None else spin_from_env(),
                               speculative is not None and speculative.startswith("draft:"))
    assert spinning is not None
    return spinning


@dataclass(frozen=True)
class EngineStats:
    waiting: int  # requests with a row still queued for a slot
    running: int  # requests with rows in the batch
    running_rows: int
    free_slots: int


def check_choices(n: int, limit: int, param: str = "n") -> None:
    """The one check of how many rows a request may ask for (the HTTP ``n`` uses it too)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise InvalidParameterError(param, f"{param} must be an integer in [1, {limit}] "
                                    f"(choices per request on this server), got {n!r}.")


class Engine:
    """Continuous batching over one model, on a thread of its own.

    Args:
        model: a loaded ``Model``, or a function that loads one (called on the engine
            thread, so ``/health`` can answer while a large folder loads).
        config: batch size, queue, budget and timeout limits.
        metrics: where to count requests and latencies (default: a fresh registry).

    Python use, without HTTP::

        with Engine(lambda: Model("out/gpt2", mixed=True)) as engine:
            request = engine.request("Hello", GenerationParams(max_new_tokens=20))
            print(engine.complete_sync(request).choices[0].text)
            # or: async for deltas in engine.stream(request): ...
    """

    def __init__(self, model: Model | Callable[[], Model], config: EngineConfig | None = None,
                 metrics: ServeMetrics | None = None) -> None:
        self.config = config if config is not None else EngineConfig()
        self.metrics = metrics if metrics is not None else ServeMetrics()
        self.output = OutputProcessor(self.metrics)
        self._source = model
        self._model: Model | None = None
        self._gen: Generator | None = None
        self._draft: object = None  # "ngram" or a draft Model, with --speculative
        self._spec_seen = SpeculationStats()  # the generator's counters already exported
        self._prefix: PrefixCache | None = None
        self._prefix_seen = PrefixCacheStats()
        self._continuous = True
        self.scheduler = Scheduler(self.config.max_batch_size, self.config.prefill_chunk,
                                   self.config.max_step_tokens)
        c = self.config
        self._stall = (StallBudget(c.max_stall, MIN_CHUNK, c.prefill_chunk)
                       if c.max_stall is not None else None)
        self._wake = threading.Condition()
        # Guarded by _wake: tickets not yet handed to the scheduler, and what waits in all.
        self._inbox: deque[Ticket] = deque()
        self._queued_rows = 0
        self._queued_tokens = 0
        self._live: list[Ticket] = []  # engine thread only: tickets the scheduler holds
        self._slot_seq: dict[int, SeqState] = {}  # changed on the engine thread
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
        """OpenAI's ``n``: rows one prompt may ask for."""
        return self.config.max_choices

    @property
    def max_rows(self) -> int:
        """Rows (prompts x n) one request may have: what the batch and the queue hold."""
        return self.config.max_queue + self.config.max_batch_size

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self._prefix

    def stats(self) -> EngineStats:
        with self._wake:
            inbox = len(self._inbox)
        live = list(self._live)
        waiting = sum(1 for t in live if any(s.slot is None for s in t.seqs))
        running = sum(1 for t in live if any(s is not None for s in t.slots))
        rows = len(self._slot_seq)
        return EngineStats(inbox + waiting, running, rows, self._free_rows())

    # ---- submitting ----------------------------------------------------------------------

    def request(self, prompt: str | Sequence[int], params: GenerationParams | None = None,
                n: int = 1) -> EngineRequest:
        """An ``EngineRequest`` for one prompt (text or token ids) and ``n`` choices."""
        model = self.model
        check_choices(n, self.max_choices)
        ids = model.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return EngineRequest.of(ids, params if params is not None else GenerationParams(), n)

    def submit(self, request: EngineRequest, push: Push) -> Ticket:
        """Queue a request; ``push`` is called on the engine thread with its output (see
        ``Ticket``). Thread-safe. ``stream``/``complete`` are the friendlier verbs.

        Raises:
            InvalidParameterError: a prompt or parameter the model cannot run.
            QueueFullError: the queue holds ``max_queue`` rows or ``max_queued_tokens``
                prompt tokens already.
            NotReadyError / ShuttingDownError: not loaded yet, or stopping.
        """
        try:
            self._validate(request)
            ticket = Ticket(self, request, push)
            rows, tokens = len(request.rows), ticket.prompt_tokens
            c = self.config
            with self._wake:
                if self._stopping:
                    raise ShuttingDownError("the server is shutting down; retry elsewhere.")
                free = self._free_rows()
                # A request that can start whole at once never waits: the token limit is
                # on what waits, so it lets in even a prompt longer than the limit then.
                starts_now = not self._queued_rows and rows <= free
                if (self._queued_rows + rows > c.max_queue + free
                        or (self._queued_tokens + tokens > c.max_queued_tokens
                            and not starts_now)):
                    raise QueueFullError(
                        f"the server is at capacity ({c.max_batch_size} rows running, "
                        f"{self._queued_rows} rows and {self._queued_tokens} prompt tokens "
                        f"queued; at most {c.max_queue} rows and {c.max_queued_tokens} "
                        "tokens wait); retry after a moment.")
                self._queued_rows += rows
                self._queued_tokens += tokens
                self._inbox.append(ticket)
                self.metrics.queue_depth.set(self._queued_rows)
                self._wake.notify()
        except (QueueFullError, NotReadyError, ShuttingDownError) as exc:
            self.metrics.outcome(exc.outcome)
            exc.counted = True  # type: ignore[attr-defined]  # the HTTP layer counts the rest
            raise
        except InvalidParameterError as exc:
            self.metrics.outcome("bad_request")
            exc.counted = True  # type: ignore[attr-defined]  # the HTTP layer counts the rest
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
        if len(request.rows) > self.max_rows:
            raise InvalidParameterError(
                "prompt", f"the request has {len(request.rows)} rows (prompts x n); this "
                f"server queues at most {self.max_rows} per request (--max-queue + "
                "--max-batch-size). Send fewer prompts per request.")
        for row in request.rows:
            plan_row(row.prompt_ids, row.params, model.context_length,
                     model.manifest.vocab_size)
            if row.params.prompt_logprobs is not None and not model.manifest.any_logits:
                raise InvalidParameterError("prompt_logprobs", model.manifest
                                            .last_position_only("prompt log-probs"))

    def _withdraw(self, ticket: Ticket) -> None:
        """A ticket was cancelled: drop it now if the engine has not taken it yet, else
        wake the engine (it frees the rows at its next step boundary)."""
        with self._wake:
            if ticket in self._inbox:
                self._inbox.remove(ticket)
                self._unqueue(len(ticket.request.rows), ticket.prompt_tokens)
                self.output.finish(ticket, None, "cancelled")
            self._wake.notify()

    def _unqueue(self, rows: int, tokens: int) -> None:
        """Rows left the queue (admitted, or dropped); call with ``_wake`` held."""
        self._queued_rows -= rows
        self._queued_tokens -= tokens
        self.metrics.queue_depth.set(self._queued_rows)

    def _free_rows(self) -> int:
        if self._continuous:
            return self.config.max_batch_size - len(self._slot_seq)
        return 0 if self._slot_seq else self.config.max_batch_size

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
                 f"continuous batching over {self.config.max_batch_size} slots, prefill "
                 f"chunks of {self.config.prefill_chunk} tokens, prefix cache "
                 f"{self.config.prefix_cache_mb if self._prefix else 0} MB"
                 if self._continuous else "rows join only an empty batch")
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
        c = self.config
        if not self._continuous:
            log.warning("%s has the standard layout: rows cannot join a running batch, so "
                        "requests start only when the batch is empty. Export with --layout "
                        "fused for continuous batching.", model.folder)
            self.scheduler = Scheduler(c.max_batch_size, c.prefill_chunk, c.max_step_tokens,
                                       joinable=False)
        spec = c.speculative
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
        if self._continuous and c.prefix_cache_mb and model.provider == "cpu":
            self._prefix = PrefixCache(c.prefix_block_tokens, c.prefix_cache_mb << 20)
        self._gen = self._new_generator()
        if c.warmup:
            self._warm_up()

    def _new_generator(self) -> Generator | None:
        assert self._model is not None
        if not self._continuous:
            return None  # one Generator per batch, made at admission
        return self._model.generator([], GenerationParams(),
                                     batch_size=self.config.max_batch_size, draft=self._draft,
                                     num_draft_tokens=self.config.num_draft_tokens,
                                     speculative_max_batch=self.config.speculative_max_batch,
                                     prefix_cache=self._prefix)

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
        self._gen.prefix_cache = None  # the prompts share pads: they would hit it
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
        self._gen.prefix_cache = self._prefix

    def _busy(self) -> bool:
        s = self.scheduler
        return bool(self._inbox or s.waiting or s.prefilling or s.running)

    def _round(self) -> bool:
        """One step: retire, admit, prompt chunks, one decode step; False when the engine
        should exit."""
        self._retire_stale()
        self.metrics.running_batch_size.set(len(self._slot_seq))  # before an idle wait
        with self._wake:
            while not (self._busy() or self._stopping):
                self._wake.wait()
            if self._stopping and (not self._busy()
                                   or time.perf_counter() >= self._drain_deadline):
                return False
            inbox, self._inbox = list(self._inbox), deque()
        for t in inbox:
            t.seqs = [SeqState(t, i, len(r.prompt_ids), decodes=r.params.max_new_tokens > 1)
                      for i, r in enumerate(t.request.rows)]
            self._live.append(t)
            self.scheduler.enqueue(t.seqs)
        self._admit()
        gen = self._gen
        decoded = self._prefill(with_decode=self._mixed_step())
        if not decoded and gen is not None and not gen.is_done():
            self._decode()
        self.metrics.running_batch_size.set(len(self._slot_seq))
        return True

    def _retire_stale(self) -> None:
        now = time.perf_counter()
        for t in list(self._live):
            if t.cancelled:
                self._retire(t, None, "cancelled")
            elif now >= t.deadline:
                self._retire(t, _timeout_error(t), "timeout")

    def _admit(self) -> None:
        """Free slots go to the oldest waiting rows; each reserves its slot (copying a
        stored prefix of its prompt in)."""
        if not self.scheduler.waiting:
            return
        if self._continuous:
            assert self._gen is not None
            free = [s for s in self._gen.free_slots if s not in self._slot_seq]
        else:
            free = [] if self._slot_seq else list(range(self.config.max_batch_size))
        seqs = self.scheduler.admit(free)
        if not seqs:
            return
        # Leaving the queue and taking a slot in one locked step: ``submit`` counts free
        # slots and queued rows together, and must never see a row in neither.
        with self._wake:
            self._unqueue(len(seqs), sum(s.prompt_tokens for s in seqs))
            for seq in seqs:
                ticket = seq.owner
                assert isinstance(ticket, Ticket) and seq.slot is not None
                ticket.slots[seq.index] = seq.slot
                self._slot_seq[seq.slot] = seq
        try:
            if self._continuous:
                assert self._gen is not None
                for seq in seqs:
                    row = seq.owner.request.rows[seq.index]  # type: ignore[attr-defined]
                    self._gen.reserve(row.prompt_ids, row.params, seq.slot)
            else:
                assert self._model is not None
                rows = [s.owner.request.rows[s.index] for s in seqs]  # type: ignore[attr-defined]
                self._gen = self._model.generator([r.prompt_ids for r in rows],
                                                  [r.params for r in rows])
                for seq, row in zip(seqs, rows, strict=True):
                    seq.left = len(row.prompt_ids)
        except Exception as exc:
            # Checked at submit, so this is rare (a cache that cannot be made): only the
            # requests admitted now fail, and the engine keeps serving.
            log.exception("admitting %d row(s) failed", len(seqs))
            error = exc if isinstance(exc, InvalidParameterError) else ModelRunError(
                f"the model could not take the request: {exc}")
            for t in {s.owner: None for s in seqs}:
                assert isinstance(t, Ticket)
                self._retire(t, error, "error")
        self._count_prefix()

    def _mixed_step(self) -> bool:
        """Whether this step's chunks and decode tokens share one model run: a mixed graph
        (``Model(mixed=True)``), rows decoding, and no speculation (a drafting row
        verifies in a run of its own)."""
        gen = self._gen
        return (self._continuous and gen is not None and gen.model.mixed
                and gen.drafter is None and bool(self.scheduler.running))

    def _prefill(self, with_decode: bool = False) -> bool:
        """Run this step's prompt chunks; ``with_decode``: in the same run as the decode
        step. Returns whether the decode step ran."""
        gen, sched = self._gen, self.scheduler
        if gen is None or not sched.prefilling:
            return False
        if self._continuous:
            for seq in sched.prefilling:  # a copy whose original left prefills on its own
                assert seq.slot is not None
                seq.left = gen.prompt_left(seq.slot)
        plan = sched.plan(self._stall.tokens() if self._stall is not None else None)
        if not plan.chunks:
            return False
        left = sum(s.left for s, _ in plan.chunks)
        hits = self._prefix.stats.hits if self._prefix is not None else 0
        decoding = list(sched.running) if with_decode else []
        try:
            if self._continuous:
                t0 = time.perf_counter()
                chunks = [(s.slot, n) for s, n in plan.chunks]
                if with_decode:
                    done, _ = gen.prefill_and_decode(chunks)
                else:
                    done = gen.prefill(chunks)
                took = time.perf_counter() - t0
            else:
                gen.generate_next_token()  # the batch's first run: every prompt
                done = [s.slot for s in sched.prefilling]
        except Exception as exc:
            # Requests were validated at submit: what fails here is the model run. Only the
            # requests with rows in the failed run fail: the chunks' rows, and the decoding
            # rows when they shared it; other rows are untouched.
            log.exception("prefill failed for %d row(s)", len(plan.chunks) + len(decoding))
            error = ModelRunError(f"the model run failed: {exc}")
            hit = {s.owner for s in sched.prefilling
                   if s.slot is not None and (not self._continuous or gen.rows[s.slot] is None)}
            hit |= {s.owner for s in decoding}
            for t in hit:
                assert isinstance(t, Ticket)
                self._retire(t, error, "error")
            return with_decode
        sched.ran(plan)
        # Tokens that ran: what the chunks took off the prompts, less blocks a row found
        # stored only now (prefilled by a row of the same burst).
        after = sum(gen.prompt_left(s.slot) for s, _ in plan.chunks
                    if self._continuous and s.slot is not None)
        if self._prefix is not None:
            hits = self._prefix.stats.hits - hits
            self._count_prefix()
        m = self.metrics
        ran = left - after - hits
        if self._stall is not None and self._continuous and ran > 0 and plan.decode_rows:
            # A shared run's chunk costs what it added to the decode step.
            d = self._stall.decode_s or 0.0
            self._stall.chunk(ran, max(took - d, 0.0) if with_decode else took)
        m.prefill_chunks.inc(len(plan.chunks))
        m.prompt_tokens.inc(ran)
        m.step_tokens.observe(ran + plan.decode_rows)
        m.step_budget_used.observe(min(1.0, (ran + plan.decode_rows) / plan.budget))
        if with_decode:
            m.mixed_runs.inc()
        owners: dict[Ticket, None] = {s.owner: None for s in decoding}  # type: ignore[misc]
        for slot in done:
            seq = self._slot_seq[slot]
            sched.started(seq)
            owners[seq.owner] = None  # type: ignore[index]
        for t in owners:
            self._emit(t)
        return with_decode

    def _decode(self) -> None:
        gen = self._gen
        assert gen is not None
        try:
            t0 = time.perf_counter()
            gen.generate_next_token()
            if self._stall is not None and gen.drafter is None:
                self._stall.decode(time.perf_counter() - t0)
        except Exception as exc:
            # The decoding rows shared that run: fail their requests. Rows still prefilling
            # are untouched, and the generator keeps serving (its lengths did not move).
            log.exception("decode step failed; failing %d row(s)", len(self.scheduler.running))
            error = ModelRunError(f"the model run failed: {exc}")
            for t in {s.owner: None for s in self.scheduler.running}:
                assert isinstance(t, Ticket)
                self._retire(t, error, "error")
            return
        self._count_speculation()
        for t in {s.owner: None for s in self.scheduler.running}:
            assert isinstance(t, Ticket)
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

    def _count_prefix(self) -> None:
        if self._prefix is None:
            return
        now, seen, m = self._prefix.stats, self._prefix_seen, self.metrics
        m.prefix_queried_tokens.inc(now.queries - seen.queries)
        m.prefix_hit_tokens.inc(now.hits - seen.hits)
        m.prefix_cache_bytes.set(self._prefix.bytes)
        self._prefix_seen = PrefixCacheStats(**vars(now))

    def _emit(self, ticket: Ticket) -> None:
        gen = self._gen
        assert gen is not None
        if self.output.emit(ticket, gen, self._leave):
            self._live.remove(ticket)

    def _leave(self, ticket: Ticket, index: int, slot: int) -> None:
        """A row is done: its slot goes back to the generator and the scheduler."""
        seq = self._slot_seq.pop(slot)
        self.scheduler.finished(seq)
        if self._continuous:
            assert self._gen is not None
            self._gen.release(slot)
        elif not self._slot_seq:
            self._gen = None  # the batch is over: the next one gets a generator of its own

    def _retire(self, ticket: Ticket, error: BaseException | None, outcome: str) -> None:
        """Take a request out now: its rows leave the batch and the queue."""
        waiting = [s for s in ticket.seqs if s.slot is None]
        if waiting:
            with self._wake:
                self._unqueue(len(waiting), sum(s.prompt_tokens for s in waiting))
        self.scheduler.drop(ticket)
        for index, slot in enumerate(ticket.slots):
            if slot is not None:
                ticket.slots[index] = None
                self._slot_seq.pop(slot, None)
                if self._continuous and self._gen is not None:
                    self._gen.release(slot)
        if not self._continuous and not self._slot_seq:
            self._gen = None
        if ticket in self._live:
            self._live.remove(ticket)
        self.output.finish(ticket, error, outcome)

    def _fail_leftovers(self) -> None:
        """On the engine thread's way out (or when it never started)."""
        error = ShuttingDownError("the server shut down before this request finished.")
        with self._wake:
            inbox, self._inbox = list(self._inbox), deque()
            self._queued_rows = self._queued_tokens = 0
            self.metrics.queue_depth.set(0)
        for t in inbox + list(self._live):
            self.output.finish(t, error, "unavailable")
        self._live.clear()
        self.scheduler.clear()
        self._slot_seq.clear()
        self.metrics.running_batch_size.set(0)


def _timeout_error(ticket: Ticket) -> RequestTimeoutError:
    elapsed = time.perf_counter() - ticket.submitted
    return RequestTimeoutError(f"the request timed out after {elapsed:.1f} s; ask for fewer "
                               "tokens or retry when the server is less busy.")
