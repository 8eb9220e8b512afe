"""The decode loop: prefill once, then one token per row per step, until every row stops.

One step: write ids/positions into the bound buffers -> run -> read the last logits ->
pick a token per row -> check stop conditions. The CLI, the batch API, streaming, the
server and the benchmark all drive this class; there is no second loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tokenizers.decoders import DecodeStream

from gpt2onnx.errors import InvalidParameterError, PromptTooLongError
from gpt2onnx.runtime.params import GenerationParams
from gpt2onnx.runtime.sampling import apply_repetition_penalty, log_softmax, sample_token

if TYPE_CHECKING:
    from gpt2onnx.runtime.model import Model

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before penalties and
    temperature, as vLLM reports by default) and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-prob), most likely first


@dataclass
class Row:
    """One prompt's progress through generation."""

    prompt_ids: list[int]
    params: GenerationParams
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    emitted: int = 0  # characters of ``text`` already handed to a streaming caller
    rng: np.random.Generator | None = None
    seen: set[int] = field(default_factory=set)
    decoder: DecodeStream | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token_ids entry

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Timings:
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)

    @property
    def decode_ms_per_token(self) -> float:
        return float(np.mean(self.decode_ms)) if self.decode_ms else 0.0


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
    if len(ids) >= capacity:
        ids = ids[-(capacity - 1):]  # keep the most recent text, room for one new token
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

    Use ``generate_next_token()`` until ``is_done()``; ``rows`` holds ids, text and
    finish reasons per slot (None for a free slot). Not thread-safe: one thread drives it.
    """

    def __init__(self, model: Model, prompts: Sequence[Sequence[int]],
                 params: GenerationParams | Sequence[GenerationParams],
                 batch_size: int | None = None) -> None:
        per_row = [params] * len(prompts) if isinstance(params, GenerationParams) else list(params)
        if len(per_row) != len(prompts):
            raise InvalidParameterError("params", f"{len(per_row)} params for {len(prompts)} "
                                        "prompts; pass one, or one per prompt.")
        size = batch_size if batch_size is not None else len(prompts)
        if size < max(1, len(prompts)):
            raise InvalidParameterError(
                "batch_size", f"batch_size must be >= the number of prompts ({len(prompts)}) "
                f"and >= 1, got {size}.")
        self.model = model
        self.cache = model.cache(size)
        self.cache.reset()
        self.eos = model.manifest.eos_token_id
        self.rows: list[Row | None] = [None] * size
        for slot, (ids, p) in enumerate(zip(prompts, per_row, strict=True)):
            self.rows[slot] = self._new_row(ids, p)
        self.timings = Timings()
        self._pending = len(prompts) > 0  # initial prompts wait for the first step
        self._last = np.zeros(size, np.int64)  # [batch] token each slot feeds next step
        self._active = np.zeros(size, bool)  # [batch] slots that decode next step

    def _new_row(self, ids: Sequence[int], params: GenerationParams) -> Row:
        ids, n_new = plan_row(ids, params, self.cache.capacity, self.model.manifest.vocab_size)
        return Row(prompt_ids=ids, params=params, max_new_tokens=n_new,
                   rng=np.random.default_rng(params.seed), seen=set(ids),
                   decoder=DecodeStream(skip_special_tokens=True))

    @property
    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None or (r.done and not self._active[i])]

    def is_done(self) -> bool:
        return not self._pending and not self._active.any()

    def add(self, prompt_ids: Sequence[int], params: GenerationParams,
            slot: int | None = None) -> int:
        """Prefill a new row into a free slot and pick its first token; returns the slot.

        Raises:
            InvalidParameterError / PromptTooLongError: bad prompt or parameters.
            RuntimeError: no free slot, or a layout without per-row caches.
        """
        if not self.cache.supports_slots:
            raise RuntimeError("rows can join a running batch only with the fused layout")
        if self._pending:
            self._prefill_initial()
        row = self._new_row(prompt_ids, params)
        if slot is None:
            free = self.free_slots
            if not free:
                raise RuntimeError("no free slot: release a finished row first")
            slot = free[0]
        t0 = time.perf_counter()
        logits = self.cache.prefill([row.prompt_ids], first_slot=slot)
        self.rows[slot] = row
        token = self._choose(logits[0], row, slot)
        _record_logprob(row, logits[0], token)
        self._take(slot, row, token)
        self.timings.prefill_ms = (time.perf_counter() - t0) * 1e3
        return slot

    def add_rows(self, prompts: Sequence[Sequence[int]], params: Sequence[GenerationParams]
                 ) -> list[int]:
        """``add`` for several rows at one step boundary: rows that land in adjacent free
        slots share one prefill run, and a prompt repeated within the call (OpenAI's
        ``n`` > 1, identical requests arriving together) is prefilled once, its other rows
        getting a copy of that row's cache slot and logits (where the cache can copy
        slots: CPU buffers). Returns the rows' slots, in order. On failure no row is left
        behind."""
        if not self.cache.supports_slots:
            raise RuntimeError("rows can join a running batch only with the fused layout")
        if self._pending:
            self._prefill_initial()
        rows = [self._new_row(ids, p) for ids, p in zip(prompts, params, strict=True)]
        free = self.free_slots
        if len(rows) > len(free):
            raise RuntimeError(f"{len(rows)} rows for {len(free)} free slots: release "
                               "finished rows first")
        source = list(range(len(rows)))  # source[k]: the row whose prefill row k reuses
        if self.cache.supports_slot_copy:
            first: dict[tuple[int, ...], int] = {}
            source = [first.setdefault(tuple(r.prompt_ids), k) for k, r in enumerate(rows)]
        runs = [k for k in range(len(rows)) if source[k] == k]
        copies = [k for k in range(len(rows)) if source[k] != k]
        # Rows that run take the lowest free slots, so adjacent ones share a run.
        slots = [0] * len(rows)
        for slot, k in zip(free, runs + copies, strict=False):
            slots[k] = slot
        t0 = time.perf_counter()
        placed: list[int] = []  # slots already holding one of these rows
        try:
            start = 0
            while start < len(runs):
                end = start + 1  # runs[start:end]: rows whose slots are consecutive
                while end < len(runs) and slots[runs[end]] == slots[runs[end - 1]] + 1:
                    end += 1
                group = runs[start:end]
                self.cache.prefill([rows[k].prompt_ids for k in group],
                                   first_slot=slots[group[0]])
                for k in group:
                    self.rows[slots[k]] = rows[k]
                    placed.append(slots[k])
                start = end
            for k in copies:
                self.cache.copy_slot(slots[source[k]], slots[k])
                self.rows[slots[k]] = rows[k]
                placed.append(slots[k])
            logits = self.cache.last_logits()  # every run wrote its own rows
            for k, row in enumerate(rows):
                row_logits = logits[slots[source[k]]]
                token = self._choose(row_logits, row, slots[k])
                _record_logprob(row, row_logits, token)
                self._take(slots[k], row, token)
        except BaseException:
            for slot in placed:
                self.release(slot)
            raise
        self.timings.prefill_ms = (time.perf_counter() - t0) * 1e3
        return slots

    def release(self, slot: int) -> None:
        """Stop a row now (finished or cancelled); its slot is free for ``add``."""
        row = self.rows[slot]
        if row is not None and not row.done:
            row.finish_reason = FINISH_CANCELLED
        self._active[slot] = False
        self.rows[slot] = None

    def generate_next_token(self) -> np.ndarray:
        """Run one model step (the prefill of the initial prompts on the first call); return
        the token picked for each slot ([batch] int64, -1 where no row advanced)."""
        if self._pending:
            return self._prefill_initial()
        if not self._active.any():
            raise RuntimeError("generation is done; add a row or start a new Generator")
        t0 = time.perf_counter()
        logits = self.cache.decode(self._last, self._active)
        picked = self._pick_all(logits, self._active.copy())
        self.timings.decode_ms.append((time.perf_counter() - t0) * 1e3)
        return picked

    def _prefill_initial(self) -> np.ndarray:
        self._pending = False
        t0 = time.perf_counter()
        n = sum(r is not None for r in self.rows)
        logits = self.cache.prefill([r.prompt_ids for r in self.rows[:n] if r is not None])
        mask = np.zeros(len(self.rows), bool)
        mask[:n] = True
        picked = self._pick_all(logits, mask)
        self.timings.prefill_ms = (time.perf_counter() - t0) * 1e3
        return picked

    def _pick_all(self, logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[rows, vocab] logits -> the next token of every slot in ``mask``."""
        picked = np.full(len(self.rows), -1, np.int64)
        plain = all(r.params.greedy and r.params.repetition_penalty == 1.0
                    for i, r in enumerate(self.rows) if mask[i] and r is not None)
        device_argmax = getattr(self.cache, "greedy_tokens", None)
        greedy = (device_argmax() if device_argmax is not None and len(logits) == len(self.rows)
                  else np.argmax(logits, axis=-1)) if plain else None
        for i in np.flatnonzero(mask):
            row = self.rows[i]
            assert row is not None
            token = int(greedy[i]) if greedy is not None else self._choose(logits[i], row, i)
            _record_logprob(row, logits[i], token)
            picked[i] = token
            self._take(i, row, token)
        return picked

    def _choose(self, logits: np.ndarray, row: Row, slot: int) -> int:
        p = row.params
        if p.repetition_penalty != 1.0:
            logits = logits.copy()  # the bound logits buffer is reused by the next step
            apply_repetition_penalty(logits, np.fromiter(row.seen, np.int64), p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        assert row.rng is not None
        return sample_token(logits, p, row.rng)

    def _take(self, slot: int, row: Row, token: int) -> None:
        self._last[slot] = token
        self._advance(row, token)
        self._active[slot] = not row.done

    def _advance(self, row: Row, token: int) -> None:
        row.token_ids.append(token)
        row.seen.add(token)
        if row.params.stop_on_eos and token == self.eos:
            row.finish_reason = FINISH_STOP
            return
        assert row.decoder is not None
        piece = row.decoder.step(self.model.tokenizer, token)
        if piece:
            start = max(0, len(row.text) - max((len(s) for s in row.params.stop), default=0))
            row.text += piece
            for s in row.params.stop:
                at = row.text.find(s, start)
                if at != -1:
                    row.text = row.text[:at]
                    row.finish_reason = FINISH_STOP
                    return
        if len(row.token_ids) >= row.max_new_tokens:
            row.finish_reason = FINISH_LENGTH

    def stream_text(self, row_index: int = 0) -> str:
        """Text of one row that is safe to show now: never a partial UTF-8 character, and
        never a tail that might still become a stop string. Advances the row's cursor."""
        row = self.rows[row_index]
        assert row is not None, f"slot {row_index} holds no row"
        end = len(row.text)
        if not row.done and row.params.stop:
            end -= _stop_prefix_len(row.text, row.params.stop)
        piece = row.text[row.emitted:end]
        row.emitted = max(row.emitted, end)
        return piece


def _record_logprob(row: Row, logits: np.ndarray, token: int) -> None:
    """Keep the chosen token's log-prob and the top alternatives when the row asked for
    them; read now because the bound logits buffer is overwritten by the next step."""
    n_top = row.params.logprobs
    if n_top is None:
        return
    logp = log_softmax(logits.astype(np.float32, copy=False))  # [vocab]
    top: tuple[tuple[int, float], ...] = ()
    if n_top:
        ids = np.argpartition(logp, -n_top)[-n_top:]
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        top = tuple((int(i), float(logp[i])) for i in ids)
    row.logprobs.append(TokenLogprob(token, float(logp[token]), top))


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
