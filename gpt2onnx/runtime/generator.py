"""The decode loop: every step appends tokens to slots through the cache's one verb.

One step: gather what each slot appends (a waiting prompt, or the token picked last step)
-> ``cache.step`` -> logits only where a row needs them -> pick a token per row over the
batch -> check stop conditions. The CLI, the batch API, streaming, scoring, the server
and the benchmark all drive this class; there is no second loop.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tokenizers.decoders import DecodeStream

from gpt2onnx.errors import Gpt2OnnxError, InvalidParameterError, PromptTooLongError
from gpt2onnx.runtime.cache import Append, StepResult
from gpt2onnx.runtime.drafting import Draft, DraftRequest, resolve_drafter
from gpt2onnx.runtime.params import GenerationParams
from gpt2onnx.runtime.prefix_cache import PrefixCache
from gpt2onnx.runtime.sampling import (
    RowSampler,
    log_softmax,
    pick_tokens,
    processed_logprobs,
    top_ids,
)
from gpt2onnx.runtime.speculative import (
    DraftLength,
    SpeculationStats,
    accept_greedy,
    accept_sampled,
    check_draft_tokens,
    check_speculative_max_batch,
)
from gpt2onnx.runtime.stops import StopText

if TYPE_CHECKING:
    from gpt2onnx.runtime.model import Model

# Weight of the newest plain step in the EMA of plain step times.
_PLAIN_EMA = 0.25

log = logging.getLogger("gpt2onnx.runtime")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


class GeneratorBusyError(Gpt2OnnxError, RuntimeError):
    """Two threads drove one Generator at once: its cache and rows have one driver."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (before penalties and temperature, as
    vLLM reports by default) and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-prob), most likely first
    rank: int = 1  # 1 + how many tokens are more likely than this one


@dataclass
class Row:
    """One prompt's progress through generation."""

    prompt_ids: list[int]
    params: GenerationParams
    max_new_tokens: int
    sampler: RowSampler
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    output: StopText = field(init=False)  # the decoded text, watched for stop strings
    decoder: DecodeStream | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token_ids entry
    # One per prompt token when params.prompt_logprobs is set; the first has no context.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.output = StopText(self.params.stop)

    @property
    def text(self) -> str:
        return self.output.text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Prefill:
    """A reserved row's progress into the cache."""

    computed: int = 0  # prompt tokens in the cache
    leader: int | None = None  # the slot with the identical prompt this row will copy
    cached: int = 0  # of ``computed``, tokens copied from the prefix cache
    looked: bool = False  # the prefix cache was asked for this row


@dataclass
class Timings:
    """Bounded: a long-lived generator (the server's) keeps a sum, not a list."""

    prefill_ms: float = 0.0
    decode_ms_total: float = 0.0
    decode_steps: int = 0
    # Tokens the furthest-advancing row gained over those steps: one per step without
    # speculation, up to k + 1 with it.
    decode_tokens: int = 0

    @property
    def decode_ms_per_token(self) -> float:
        return self.decode_ms_total / self.decode_tokens if self.decode_tokens else 0.0


def plan_row(prompt_ids: Sequence[int], params: GenerationParams, capacity: int, vocab: int
             ) -> tuple[list[int], int]:
    """Check one prompt against the vocabulary and the context; apply ``on_overflow``.

    Returns the (possibly left-truncated) prompt and the number of tokens to generate.
    """
    ids = list(prompt_ids)
    if not ids:
        raise InvalidParameterError("prompt", "prompt is empty; give at least one token of text.")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidParameterError(
            "prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab - 1}]; use ids "
            "from this model's tokenizer.")
    wanted = len(ids) + params.max_new_tokens
    if wanted <= capacity:
        return ids, params.max_new_tokens
    if params.on_overflow == "error":
        if len(ids) >= capacity:
            raise PromptTooLongError(
                "prompt", f"prompt has {len(ids)} tokens; the context holds {capacity} "
                f"(prompt + max_new_tokens <= {capacity}). Shorten the prompt or pass "
                "on_overflow='truncate'.")
        raise PromptTooLongError(
            "max_new_tokens", f"prompt ({len(ids)} tokens) + max_new_tokens "
            f"({params.max_new_tokens}) = {wanted} exceeds the context of {capacity}; ask for "
            f"at most {capacity - len(ids)} new tokens or pass on_overflow='truncate'.")
    # Keep the most recent text, with room for one new token when any is asked for.
    keep = capacity - (1 if params.max_new_tokens else 0)
    if len(ids) > keep:
        ids = ids[-keep:]
    return ids, min(params.max_new_tokens, capacity - len(ids))


class Generator:
    """Step-level generation over a batch of rows, each with its own parameters.

    Args:
        model: a loaded ``Model``.
        prompts: token ids per row, prefilled together by the first step.
        params: one ``GenerationParams`` for all rows, or one per row.
        batch_size: slots in the cache (default: one per prompt). With the fused layout,
            ``add`` prefills a new row into a free slot between steps and ``release``
            frees one at once: continuous batching.

    The generator owns its cache: two generators never share buffers, and the cache goes
    back to the model's small idle pool when the generator is closed or collected. Use
    ``generate_next_token()`` until ``is_done()``; ``rows`` holds ids, text and finish
    reasons per slot (None for a free slot). One thread drives it at a time; a second
    one gets ``GeneratorBusyError``.
    """

    def __init__(self, model: Model, prompts: Sequence[Sequence[int]],
                 params: GenerationParams | Sequence[GenerationParams],
                 batch_size: int | None = None, draft: object = None,
                 num_draft_tokens: int = 8, speculative_max_batch: int = 2,
                 prefix_cache: PrefixCache | None = None) -> None:
        per_row = [params] * len(prompts) if isinstance(params, GenerationParams) else list(params)
        if len(per_row) != len(prompts):
            raise InvalidParameterError("params", f"{len(per_row)} params for {len(prompts)} "
                                        "prompts; pass one, or one per prompt.")
        size = batch_size if batch_size is not None else len(prompts)
        if isinstance(size, bool) or not isinstance(size, int) or size < max(1, len(prompts)):
            raise InvalidParameterError(
                "batch_size", f"batch_size must be an integer >= the number of prompts "
                f"({len(prompts)}) and >= 1, got {size!r}.")
        self.model = model
        self.eos = model.manifest.eos_token_id
        self.capacity = model.context_length
        planned = [self._new_row(ids, p) for ids, p in zip(prompts, per_row, strict=True)]
        self.cache = model.cache(size)
        # The cache returns to the model's idle pool when this generator is gone.
        self._finalizer = weakref.finalize(self, model._return_cache, self.cache)
        self.rows: list[Row | None] = [None] * size
        self._waiting: list[int] = []  # slots whose prompt is not in the cache yet
        self._prefilling: dict[int, _Prefill] = {}  # reserved rows entering in chunks
        # Stored prompt blocks reused by later prompts (CPU buffers only: they copy).
        self.prefix_cache = prefix_cache if self.cache.supports_slot_copy else None
        for slot, row in enumerate(planned):
            self.rows[slot] = row
            self._waiting.append(slot)
        self.timings = Timings()
        self._last = np.zeros(size, np.int64)  # [batch] token each slot feeds next step
        self._active = np.zeros(size, bool)  # [batch] slots that decode next step
        self._driver = threading.Lock()
        self._stack_buf: np.ndarray | None = None  # [batch, vocab] sampled rows' logits
        # Speculative decoding: the drafter (and a draft model's cache) belongs to this
        # generator, as the target cache does.
        self.num_draft_tokens = check_draft_tokens(num_draft_tokens)
        self.speculative_max_batch = check_speculative_max_batch(speculative_max_batch)
        if draft is not None and not self.cache.supports_slots:
            raise InvalidParameterError(
                "draft", "speculative decoding needs a fused model folder (rows are rewound "
                "one by one); re-export with --layout fused.")
        if draft is not None and not model.manifest.any_logits:
            raise InvalidParameterError("draft", model.manifest.last_position_only(
                "speculative decoding (logits at every drafted position)"))
        self.drafter = resolve_drafter(draft, model, size)
        if self.drafter is not None:
            self._finalizer.detach()
            drafter = self.drafter
            self._finalizer = weakref.finalize(self, _close_both, model, self.cache, drafter)
        self.speculation = SpeculationStats()
        self._draft_len: list[DraftLength | None] = [None] * size
        # Wall ms of a plain step while speculation could run (an EMA): what a greedy
        # round's ms per token produced is held against. None until one was timed.
        self._plain_step_ms: float | None = None

    def close(self) -> None:
        """Hand the cache back to the model now (also happens when the generator is
        collected); the generator cannot step afterwards."""
        if not self._driver.acquire(blocking=False):  # never while a thread is in a step
            raise GeneratorBusyError("another thread is driving this Generator; close it "
                                     "from the thread that drives it, after its step.")
        try:
            self._finalizer()  # idempotent
        finally:
            self._driver.release()

    @contextmanager
    def _driving(self) -> Iterator[None]:
        if not self._driver.acquire(blocking=False):
            raise GeneratorBusyError(
                "another thread is driving this Generator; a Generator (and its cache) has "
                "one driver at a time: give each thread its own Generator.")
        try:
            if not self._finalizer.alive:
                raise RuntimeError("this Generator was closed; start a new one")
            yield
        finally:
            self._driver.release()

    def _new_row(self, ids: Sequence[int], params: GenerationParams) -> Row:
        ids, n_new = plan_row(ids, params, self.capacity, self.model.manifest.vocab_size)
        if params.prompt_logprobs is not None and not self.model.manifest.any_logits:
            raise InvalidParameterError("prompt_logprobs", self.model.manifest
                                        .last_position_only("prompt log-probs"))
        return Row(prompt_ids=ids, params=params, max_new_tokens=n_new,
                   sampler=RowSampler(params, ids, self.eos),
                   decoder=DecodeStream(skip_special_tokens=True))

    @property
    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.rows)
                if r is None or (r.done and not self._active[i] and i not in self._waiting)]

    def is_done(self) -> bool:
        return not self._waiting and not self._active.any()

    def add(self, prompt_ids: Sequence[int], params: GenerationParams,
            slot: int | None = None) -> int:
        """Prefill a new row into a free slot and pick its first token; returns the slot.

        Raises:
            InvalidParameterError / PromptTooLongError: bad prompt or parameters.
            RuntimeError: no free slot, or a layout without per-row caches.
        """
        if slot is not None:
            if not 0 <= slot < len(self.rows) or slot not in self.free_slots:
                raise RuntimeError(f"slot {slot} is not free: release it first")
            return self._add_rows([prompt_ids], [params], [slot])[0]
        return self.add_rows([prompt_ids], [params])[0]

    def add_rows(self, prompts: Sequence[Sequence[int]], params: Sequence[GenerationParams]
                 ) -> list[int]:
        """``add`` for several rows at one step boundary: rows that land in adjacent free
        slots share one prefill run, and a prompt repeated within the call (OpenAI's
        ``n`` > 1, identical requests arriving together) is prefilled once, its other rows
        getting a copy of that row's cache slot and logits (where the cache can copy
        slots: CPU buffers). Returns the rows' slots, in order. On failure no row is left
        behind."""
        return self._add_rows(prompts, params, None)

    def _add_rows(self, prompts: Sequence[Sequence[int]], params: Sequence[GenerationParams],
                  slots_asked: list[int] | None) -> list[int]:
        with self._driving():
            if not self.cache.supports_slots:
                raise RuntimeError("rows can join a running batch only with the fused layout")
            if self._waiting:
                self._prefill_waiting()
            rows = [self._new_row(ids, p) for ids, p in zip(prompts, params, strict=True)]
            free = slots_asked if slots_asked is not None else self.free_slots
            if len(rows) > len(free):
                raise RuntimeError(f"{len(rows)} rows for {len(free)} free slots: release "
                                   "finished rows first")
            # Rows with a prompt of their own take the lowest free slots (adjacent ones
            # share a run); repeats follow them and get copies.
            source = list(range(len(rows)))  # the row whose prefill row k copies
            if self.cache.supports_slot_copy:
                first: dict[tuple, int] = {}
                source = [first.setdefault(_copy_key(r), k) for k, r in enumerate(rows)]
            leaders = [k for k in range(len(rows)) if source[k] == k]
            order = leaders + [k for k in range(len(rows)) if source[k] != k]
            slots = [0] * len(rows)
            for slot, k in zip(free, order, strict=False):
                slots[k] = slot
            t0 = time.perf_counter()
            for k in order:  # rows of this call follow only each other
                self._reserve(rows[k], slots[k],
                              None if source[k] == k else slots[source[k]])
            try:
                self._prefill([(slots[k], self.prompt_left(slots[k])) for k in leaders])
            except BaseException:
                for slot in slots:
                    self._drop(slot)
                raise
            self.timings.prefill_ms = (time.perf_counter() - t0) * 1e3
            return slots

    # -- chunked prefill: rows that enter the cache over several steps ---------------------

    def reserve(self, prompt_ids: Sequence[int], params: GenerationParams,
                slot: int | None = None) -> int:
        """Give a new row a free slot without running anything: its prompt then enters the
        cache in chunks through ``prefill``, between decode steps, and the row decodes from
        the step after its last chunk. A stored prefix of the prompt (``prefix_cache``) is
        copied in at once; a prompt identical to one still prefilling waits for it and
        gets a copy. Returns the slot.

        Raises:
            InvalidParameterError / PromptTooLongError: bad prompt or parameters.
            RuntimeError: no free slot, or a layout without per-row caches.
        """
        with self._driving():
            if not self.cache.supports_slots:
                raise RuntimeError("rows can join a running batch only with the fused layout")
            if self._waiting:
                self._prefill_waiting()
            row = self._new_row(prompt_ids, params)
            free = self.free_slots
            if slot is None and free:
                slot = free[0]
            if slot is None or slot not in free:
                raise RuntimeError(f"slot {slot} is not free: release finished rows first")
            self._reserve(row, slot, _AUTO)
            return slot

    def _reserve(self, row: Row, slot: int, leader: int | object | None) -> None:
        """Put ``row`` in ``slot``, to prefill; ``leader``: the slot whose identical prompt
        it copies, None for none, ``_AUTO`` for any such row still prefilling."""
        self.cache.release(slot)
        self._forget_draft(slot)
        self._active[slot] = False
        self.rows[slot] = row
        state = _Prefill()
        if leader is _AUTO and self.cache.supports_slot_copy:
            key = _copy_key(row)
            leader = next((s for s, other in self._prefilling.items()
                           if other.leader is None and (r := self.rows[s]) is not None
                           and _copy_key(r) == key), None)
        state.leader = leader if isinstance(leader, int) else None
        if state.leader is None:
            self._look_up_prefix(row, slot, state)
        self._prefilling[slot] = state

    def _look_up_prefix(self, row: Row, slot: int, state: _Prefill) -> None:
        """Copy the stored prefix of the row's prompt in (rows asking for prompt log-probs
        prefill it all: the store keeps no log-probs); again later, from where it is."""
        if self.prefix_cache is None or row.params.prompt_logprobs is not None:
            return
        have = state.computed if state.looked else None
        state.computed = state.cached = self.prefix_cache.load(row.prompt_ids, self.cache,
                                                               slot, have=have)
        state.looked = True

    def prompt_left(self, slot: int) -> int:
        """Prompt tokens of a prefilling row still to run (0 for a row that will copy an
        identical prompt's slot, or a row that is not prefilling)."""
        state = self._prefilling.get(slot)
        if state is None or state.leader is not None:
            return 0
        row = self.rows[slot]
        assert row is not None
        return len(row.prompt_ids) - state.computed

    def prefill(self, chunks: Sequence[tuple[int, int]]) -> list[int]:
        """Run the next ``n`` prompt tokens of each (slot, n) of reserved rows, in one step
        (empty slots next to each other share a run; a chunk onto a slot's earlier chunks
        runs on its own, as GroupQueryAttention on the CPU takes several new tokens onto a
        past only at batch 1). Rows whose prompt is then whole pick their first token and
        decode from the next step, with the rows that copy them. Returns those slots.
        On failure the rows of the chunks (and their copies) are dropped: their slots are
        free, and every other row is as it was."""
        with self._driving():
            t0 = time.perf_counter()
            involved = {s for s, _ in chunks}
            involved |= {f for f, st in self._prefilling.items() if st.leader in involved}
            try:
                done = self._prefill(chunks)
            except BaseException:
                for slot in involved:
                    self._drop(slot)
                raise
            self.timings.prefill_ms = (time.perf_counter() - t0) * 1e3
            return done

    def prefill_and_decode(self, chunks: Sequence[tuple[int, int]]
                           ) -> tuple[list[int], np.ndarray]:
        """``prefill(chunks)`` and a plain decode step for every decoding row in one cache
        step: with a mixed cache (``Model(mixed=True)``), one model run, a single pass over
        the weights instead of two. No row speculates in it. Returns (the slots whose
        prompt is now whole, as ``prefill``; the tokens picked, as
        ``generate_next_token``). On failure the chunks' rows (and their copies) are
        dropped and the decoding rows are as they were (their lengths did not move)."""
        with self._driving():
            t0 = time.perf_counter()
            involved = {s for s, _ in chunks}
            involved |= {f for f, st in self._prefilling.items() if st.leader in involved}
            slots = np.flatnonzero(self._active)
            try:
                appends, plan = self._prefill_appends(chunks)
                decode = [Append(int(s), self._last[s:s + 1]) for s in slots]
                result = self.cache.step(appends + decode)
            except BaseException:
                for slot in involved:
                    self._drop(slot)
                raise
            picked = self._decoded(slots, result, len(appends))
            done = self._prefilled(plan, result)
            elapsed = (time.perf_counter() - t0) * 1e3
            self.timings.prefill_ms = elapsed
            if slots.size:
                self.timings.decode_ms_total += elapsed
                self.timings.decode_steps += 1
                self.timings.decode_tokens += 1
            return done, picked

    def _prefill(self, chunks: Sequence[tuple[int, int]]) -> list[int]:
        appends, plan = self._prefill_appends(chunks)
        return self._prefilled(plan, self.cache.step(appends))

    def _prefill_appends(self, chunks: Sequence[tuple[int, int]]) -> tuple[list, list]:
        """The appends of prompt chunks, and what ``_prefilled`` needs of each."""
        appends, plan = [], []
        for slot, n in chunks:
            state = self._prefilling[slot]
            row = self.rows[slot]
            assert row is not None and state.leader is None
            if state.computed == state.cached:
                # Nothing of its own ran yet: a row that prefilled since it was reserved
                # (the same system prompt, arriving in the same burst) may have stored more.
                self._look_up_prefix(row, slot, state)
            a = state.computed
            b = min(a + max(1, n), len(row.prompt_ids))
            last = b == len(row.prompt_ids)
            scoring = row.params.prompt_logprobs is not None
            appends.append(Append(slot, row.prompt_ids[a:b],
                                  (b - a) if scoring else int(last)))
            plan.append((slot, row, a, b, last))
        return appends, plan

    def _prefilled(self, plan: list, result: StepResult) -> list[int]:
        """Book prompt chunks that ran (results 0 .. len(plan) - 1 of ``result``)."""
        finishing: list[tuple[int, Row, int]] = []
        for k, (slot, row, a, b, last) in enumerate(plan):
            self._prefilling[slot].computed = b
            if row.params.prompt_logprobs is not None:
                row.prompt_logprobs += _prompt_logprobs(row, result.logits(k), a)
            if self.prefix_cache is not None and self.cache.supports_slot_copy:
                self.prefix_cache.store(row.prompt_ids, self.cache, slot, b)
            if last:
                finishing.append((slot, row, k))
        entries: list[tuple[int, Row, int]] = []
        for slot, row, k in finishing:  # copies first: a finished row releases its slot
            del self._prefilling[slot]
            entries.append((slot, row, k))
            for f in [f for f, st in self._prefilling.items() if st.leader == slot]:
                follower = self.rows[f]
                assert follower is not None
                self.cache.copy_slot(slot, f)
                follower.prompt_logprobs = list(row.prompt_logprobs)
                del self._prefilling[f]
                entries.append((f, follower, k))
        self._first_tokens(entries, result)
        return [slot for slot, _, _ in entries]

    def _drop(self, slot: int) -> None:
        """Forget a row that never finished its prefill (or never started decoding)."""
        self._prefilling.pop(slot, None)
        for st in self._prefilling.values():
            if st.leader == slot:  # its copies prefill on their own now
                st.leader = None
        self.cache.release(slot)
        self.rows[slot] = None
        self._active[slot] = False

    def release(self, slot: int) -> None:
        """Stop a row now (finished or cancelled); its slot is free for ``add``."""
        with self._driving():
            row = self.rows[slot]
            if row is not None and not row.done:
                row.finish_reason = FINISH_CANCELLED
            self._active[slot] = False
            if slot in self._waiting:
                self._waiting.remove(slot)
            if slot in self._prefilling:
                self._drop(slot)
            self.rows[slot] = None
            if self.cache.supports_slots:
                self.cache.release(slot)
            self._forget_draft(slot)

    def _forget_draft(self, slot: int) -> None:
        if self.drafter is not None:
            self.drafter.release(slot)
            self._draft_len[slot] = None

    def generate_next_token(self) -> np.ndarray:
        """Run one model step (the prefill of the initial prompts on the first call); return
        the token picked for each slot ([batch] int64, -1 where no row advanced)."""
        with self._driving():
            if self._waiting:
                return self._prefill_waiting()
            if not self._active.any():
                raise RuntimeError("generation is done; add a row or start a new Generator")
            t0 = time.perf_counter()
            slots = np.flatnonzero(self._active)
            could_draft = self.drafter is not None and slots.size <= self.speculative_max_batch
            # The first such step is a plain one, so that rounds have a plain step to be
            # held against (it costs nothing: a plain step is what would run anyway).
            if could_draft and self._plain_step_ms is not None:
                requests = self._draft_requests(slots)
                if requests:
                    picked = self._speculative_step(slots, requests, t0)
                    self.timings.decode_ms_total += (time.perf_counter() - t0) * 1e3
                    return picked
            result = self.cache.step([Append(int(s), self._last[s:s + 1]) for s in slots])
            picked = self._decoded(slots, result, 0)
            elapsed = (time.perf_counter() - t0) * 1e3
            if could_draft:
                before = self._plain_step_ms
                self._plain_step_ms = elapsed if before is None else \
                    before + _PLAIN_EMA * (elapsed - before)
            self.timings.decode_ms_total += elapsed
            self.timings.decode_steps += 1
            self.timings.decode_tokens += 1
            return picked

    def _decoded(self, slots: np.ndarray, result: StepResult, offset: int) -> np.ndarray:
        """Pick the next token of the rows in ``slots`` from results ``offset`` on."""
        picked = np.full(len(self.rows), -1, np.int64)
        entries = []
        for k, s in enumerate(slots.tolist()):
            row = self.rows[s]
            assert row is not None
            entries.append((s, row, offset + k))
        if entries:
            self._pick(entries, result, picked)
        return picked

    # -- speculative decoding ---------------------------------------------------------------

    def _draft_requests(self, slots: np.ndarray) -> list[DraftRequest]:
        """Rows that draft this step, with how many tokens each may check: no more than
        it may still generate less one (the target's own token comes on top) and the
        cache can hold."""
        requests = []
        for s in slots.tolist():
            row = self.rows[s]
            assert row is not None
            wanted = row.params.num_draft_tokens
            if wanted == 0:
                continue
            length = self._draft_len[s]
            if length is None:
                length = self._draft_len[s] = DraftLength(wanted or self.num_draft_tokens)
            k = length.wanted()
            context = len(row.prompt_ids) + len(row.token_ids)  # the target holds all but one
            k = min(k, row.max_new_tokens - len(row.token_ids) - 1, self.capacity - context)
            if k <= 0:
                continue
            ids = np.fromiter(itertools.chain(row.prompt_ids, row.token_ids), np.int64, context)
            requests.append(DraftRequest(s, ids, k, row.sampler if row.sampler.sampled else None))
        return requests

    def _speculative_step(self, slots: np.ndarray, requests: list[DraftRequest],
                          t0: float) -> np.ndarray:
        """One target step in which the drafting rows append their next input plus their
        draft (logits at every one of those positions) and the others one token."""
        assert self.drafter is not None
        drafts: dict[int, Draft] = {}
        try:
            proposed = self.drafter.propose(requests)
        except Exception:  # drafts are guesses: without them the step is a plain one
            log.warning("the drafter failed; this step decodes without drafts",
                        exc_info=True)
            proposed = []
        for r, d in zip(requests, proposed, strict=False):
            if d.tokens.size:
                drafts[r.slot] = d
        appends = []
        for s in slots.tolist():
            d = drafts.get(s)
            if d is None:
                appends.append(Append(s, self._last[s:s + 1]))
            else:
                tokens = np.concatenate((self._last[s:s + 1], d.tokens))
                appends.append(Append(s, tokens, keep=tokens.size))
        before = {s: int(self.cache.lengths[s]) for s in drafts}
        result = self.cache.step(appends)
        picked = np.full(len(self.rows), -1, np.int64)
        plain: list[tuple[int, Row, int]] = []
        pending = set(drafts)  # rows whose cache still holds every drafted token
        try:
            gained = self._verify_all(slots, drafts, result, before, picked, plain, pending, t0)
        except BaseException:
            for s in pending:  # forget the unverified tokens: that part of the step is lost
                self.cache.rewind(s, before[s])
                if self.drafter is not None:
                    self.drafter.accepted(s, before[s])
            raise
        if plain:
            self._pick(plain, result, picked)
        self.timings.decode_steps += 1
        self.timings.decode_tokens += gained
        return picked

    def _verify_all(self, slots: np.ndarray, drafts: dict[int, Draft], result: StepResult,
                    before: dict[int, int], picked: np.ndarray,
                    plain: list[tuple[int, Row, int]], pending: set[int], t0: float) -> int:
        """Verify each drafting row of the step; collect the others into ``plain``.
        Returns the most tokens a row gained."""
        assert self.drafter is not None
        gained = 1
        # Drafting and the verification run so far (the verification's own Python is
        # small and the same for a plain step's pick).
        round_ms = (time.perf_counter() - t0) * 1e3
        for k, s in enumerate(slots.tolist()):
            row = self.rows[s]
            assert row is not None
            d = drafts.get(s)
            if d is None:
                plain.append((s, row, k))
                continue
            start = len(row.token_ids)
            pending.discard(s)  # from here on its tokens are taken, then rewound below
            accepted = self._verify(s, row, d, result, k)
            picked[s] = row.token_ids[-1]
            stats = self.speculation
            stats.rounds += 1
            stats.proposed += d.tokens.size
            stats.accepted += accepted
            stats.emitted += len(row.token_ids) - start
            gained = max(gained, len(row.token_ids) - start)
            length = self._draft_len[s]
            if length is not None:
                # Only greedy rows judge rounds by time: their output is the same either
                # way, while a sampled row's draws depend on whether it speculated, and a
                # seeded row must not change with the machine's load.
                slower = not row.sampler.sampled and self._plain_step_ms is not None and \
                    round_ms > self._plain_step_ms * (len(row.token_ids) - start)
                length.update(d.tokens.size, accepted, slower)
            if row.done:
                self._forget_draft(s)
                continue
            settled = before[s] + 1 + accepted  # the next input and the accepted drafts
            self.cache.rewind(s, settled)
            self.drafter.accepted(s, settled)
        return gained

    def _verify(self, slot: int, row: Row, draft: Draft, result: StepResult, k: int) -> int:
        """Take the tokens the target agrees with, then its own; returns the drafts kept."""
        logits = result.logits(k) if not row.sampler.plain_greedy or row.params.logprobs \
            is not None else None  # [n + 1, vocab]
        taken = 0

        def take(token: int) -> bool:
            nonlocal taken
            if row.params.logprobs is not None:
                assert logits is not None
                row.logprobs.append(_logprob_of(logits[taken], token, row.params.logprobs))
            taken += 1
            self._take(slot, row, token)
            return not row.done

        tokens = draft.tokens.tolist()
        if row.sampler.plain_greedy:
            target = result.argmax(k).tolist()  # [n + 1] the device argmax per position
            accepted = accept_greedy(tokens, target)
            for token in [*tokens[:accepted], target[accepted]]:
                if not take(int(token)):
                    break
            return min(accepted, taken)  # a row that ended inside the draft kept fewer
        if logits is None:
            logits = result.logits(k)
        if not row.sampler.sampled:  # greedy with processors: argmax of the processed scores
            accepted = 0
            for j in range(len(tokens) + 1):
                token = int(pick_tokens(logits[j:j + 1], [row.sampler])[0])
                if j == len(tokens) or token != tokens[j]:
                    take(token)
                    break
                accepted += 1
                if not take(token):
                    break
            return accepted

        def p_at(j: int) -> np.ndarray:
            return np.exp(processed_logprobs(logits[j:j + 1], [row.sampler])[0])

        return accept_sampled(draft.tokens, draft.probs, p_at, row.sampler.draw, take)

    def _prefill_waiting(self) -> np.ndarray:
        t0 = time.perf_counter()
        slots, self._waiting = self._waiting, []
        rows = [self.rows[s] for s in slots]
        try:
            result = self.cache.step([Append(s, r.prompt_ids, _keep(r))
                                      for s, r in zip(slots, rows, strict=True)])
        except BaseException:
            self._waiting = slots  # nothing entered the cache: the prompts still wait
            raise
        picked = np.full(len(self.rows), -1, np.int64)
        self._after_prompts([(s, r, k) for k, (s, r) in enumerate(zip(slots, rows, strict=True))],
                            result, picked)
        self.timings.prefill_ms = (time.perf_counter() - t0) * 1e3
        return picked

    def _after_prompts(self, entries: list[tuple[int, Row, int]], result: StepResult,
                       picked: np.ndarray | None = None) -> None:
        """Record prompt log-probs, then pick the first token of rows that generate."""
        for _, row, k in entries:
            if row.params.prompt_logprobs is not None:
                row.prompt_logprobs = _prompt_logprobs(row, result.logits(k))
        self._first_tokens(entries, result, picked)

    def _first_tokens(self, entries: list[tuple[int, Row, int]], result: StepResult,
                      picked: np.ndarray | None = None) -> None:
        """Pick the first token of rows whose prompt is in the cache now."""
        generating = []
        for slot, row, k in entries:
            if row.max_new_tokens == 0:
                row.finish_reason = FINISH_LENGTH  # scored, nothing to generate
                self._active[slot] = False
                if self.cache.supports_slots:
                    self.cache.release(slot)
            else:
                generating.append((slot, row, k))
        self._pick(generating, result, picked)

    def _pick(self, entries: list[tuple[int, Row, int]], result: StepResult,
              picked: np.ndarray | None) -> None:
        """The next token of each (slot, row, result index), from the logits at the row's
        newest position: the device argmax for plain greedy rows, one batched sampler call
        for the rest."""
        tokens: dict[int, int] = {}
        need = []
        for slot, row, k in entries:
            sampler = row.sampler
            if sampler.plain_greedy:
                tokens[slot] = int(result.argmax(k)[-1])
            elif sampler.greedy_but_eos and (
                    top := int(result.argmax(k)[-1])) != sampler.eos_token_id:
                # min_tokens alone cannot move an argmax that is not EOS: no logits needed
                # (stacking and processing them cost 2.4 ms per 16-row gpt2 step).
                tokens[slot] = top
            else:
                need.append((slot, row, k))
        if need:
            stacked = self._stack([result.logits(k)[-1] for _, _, k in need])  # [rows, vocab]
            chosen = pick_tokens(stacked, [r.sampler for _, r, _ in need])
            for (slot, _, _), t in zip(need, chosen.tolist(), strict=True):
                tokens[slot] = int(t)
        for slot, row, k in entries:
            token = tokens[slot]
            if row.params.logprobs is not None:
                row.logprobs.append(_logprob_of(result.logits(k)[-1], token,
                                                row.params.logprobs))
            if picked is not None:
                picked[slot] = token
            self._take(slot, row, token)

    def _stack(self, rows: list[np.ndarray]) -> np.ndarray:
        """[n, vocab] of n logits rows: a read-only view when they are consecutive rows of
        one buffer (a decode step's, the usual case), else a copy into a buffer kept for it.
        Never a fresh multi-MB array per step: those are mmapped and page-fault every time."""
        first, n = rows[0], len(rows)
        width = first.shape[0] * first.itemsize
        base = first.base if first.base is not None else first
        if all(r.base is base and r.ctypes.data == first.ctypes.data + i * width
               for i, r in enumerate(rows)) and first.flags.c_contiguous:
            return np.lib.stride_tricks.as_strided(first, (n, first.shape[0]),
                                                   (width, first.itemsize), writeable=False)
        if self._stack_buf is None or self._stack_buf.shape[0] < n:
            self._stack_buf = np.empty((len(self.rows), first.shape[0]), np.float32)
        return np.stack(rows, out=self._stack_buf[:n])

    def _take(self, slot: int, row: Row, token: int) -> None:
        self._last[slot] = token
        row.sampler.observe(token)
        self._advance(row, token)
        self._active[slot] = not row.done
        if row.done and self.cache.supports_slots:
            # Its ids and text live in the row; an empty slot rides later steps for free.
            self.cache.release(slot)
            self._forget_draft(slot)

    def _advance(self, row: Row, token: int) -> None:
        row.token_ids.append(token)
        # min_tokens: neither EOS nor a stop string ends the row before it (as vLLM, which
        # skips stop checks while the output is shorter than min_tokens).
        early = len(row.token_ids) < row.params.min_tokens
        if row.params.stop_on_eos and token == self.eos and not early:
            row.finish_reason = FINISH_STOP
            return
        assert row.decoder is not None
        piece = row.decoder.step(self.model.tokenizer, token)
        if piece and row.output.add(piece, check=not early):
            row.finish_reason = FINISH_STOP
            return
        if len(row.token_ids) >= row.max_new_tokens:
            row.finish_reason = FINISH_LENGTH

    def stream_text(self, row_index: int = 0) -> str:
        """Text of one row that is safe to show now: never a partial UTF-8 character, and
        never a tail that might still become a stop string. Advances the row's cursor."""
        row = self.rows[row_index]
        assert row is not None, f"slot {row_index} holds no row"
        return row.output.take_new(row.done)


def _close_both(model: Model, cache, drafter) -> None:
    """The generator is gone: its target cache back to the model's pool, and its
    drafter's (a draft model's cache back to the draft model's pool)."""
    model._return_cache(cache)
    drafter.close()


_AUTO = object()  # _reserve: follow any identical prompt still prefilling


def _copy_key(row: Row) -> tuple:
    """Rows with equal keys can share one prefill (a slot copy): same prompt, and the
    same prompt log-probs asked for."""
    return (tuple(row.prompt_ids), row.params.prompt_logprobs)


def _keep(row: Row) -> int:
    """Positions of the prompt that need logits: all of them for prompt log-probs."""
    return len(row.prompt_ids) if row.params.prompt_logprobs is not None else 1


def _logprob_of(logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    """The chosen token's log-prob and the top alternatives, read now because the bound
    logits buffer is overwritten by the next step."""
    logp = log_softmax(logits.astype(np.float32, copy=False)[None])  # [1, vocab]
    top: tuple[tuple[int, float], ...] = ()
    if n_top:
        top = tuple((int(i), float(logp[0, i])) for i in top_ids(logp, n_top)[0])
    rank = 1 + int((logp[0] > logp[0, token]).sum())
    return TokenLogprob(token, float(logp[0, token]), top, rank)


def _prompt_logprobs(row: Row, logits: np.ndarray, start: int = 0
                     ) -> list[TokenLogprob | None]:
    """Log-prob of each prompt token given the ones before it, from the [n, vocab] logits
    of prompt positions [start, start + n) (a whole prompt, or one chunk of it): position
    i's logits score token i + 1. The first token has no context, so None."""
    n_top = row.params.prompt_logprobs
    assert n_top is not None
    targets = np.asarray(row.prompt_ids[start + 1:start + 1 + len(logits)], np.int64)
    out: list[TokenLogprob | None] = [None] if start == 0 else []
    if not len(targets):
        return out
    logp = log_softmax(logits[:len(targets)].astype(np.float32, copy=False))
    chosen = logp[np.arange(len(targets)), targets]
    ranks = 1 + (logp > chosen[:, None]).sum(axis=1)
    tops = top_ids(logp, n_top) if n_top else np.zeros((len(targets), 0), np.int64)
    for i, t in enumerate(targets.tolist()):
        top = tuple((int(j), float(logp[i, j])) for j in tops[i])
        out.append(TokenLogprob(t, float(chosen[i]), top, int(ranks[i])))
    return out
