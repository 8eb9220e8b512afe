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
from gpt2onnx.runtime.sampling import apply_repetition_penalty, sample_token

if TYPE_CHECKING:
    from gpt2onnx.runtime.model import Model

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


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
    """Step-level generation over a batch of prompts (each with its own parameters).

    Args:
        model: a loaded ``Model``.
        prompts: token ids per row.
        params: one ``GenerationParams`` for all rows, or one per row.

    Use ``generate_next_token()`` until ``is_done()``; ``rows`` holds ids, text and
    finish reasons. Not thread-safe: one generator runs on a model at a time.
    """

    def __init__(self, model: Model, prompts: Sequence[Sequence[int]],
                 params: GenerationParams | Sequence[GenerationParams]) -> None:
        if not prompts:
            raise InvalidParameterError("prompt", "no prompts given; pass at least one.")
        per_row = [params] * len(prompts) if isinstance(params, GenerationParams) else list(params)
        if len(per_row) != len(prompts):
            raise InvalidParameterError("params", f"{len(per_row)} params for {len(prompts)} "
                                        "prompts; pass one, or one per prompt.")
        self.model = model
        self.cache = model.cache(len(prompts))
        self.eos = model.manifest.eos_token_id
        self.rows: list[Row] = []
        for ids, p in zip(prompts, per_row, strict=True):
            ids, n_new = plan_row(ids, p, self.cache.capacity, model.manifest.vocab_size)
            self.rows.append(Row(prompt_ids=ids, params=p, max_new_tokens=n_new,
                                 rng=np.random.default_rng(p.seed), seen=set(ids),
                                 decoder=DecodeStream(skip_special_tokens=True)))
        self.timings = Timings()
        self._started = False
        self._last = np.zeros(len(self.rows), np.int64)  # [batch] token fed next step
        self._active = np.ones(len(self.rows), bool)
        self._all_plain_greedy = all(r.params.greedy and r.params.repetition_penalty == 1.0
                                     for r in self.rows)

    def is_done(self) -> bool:
        return all(r.done for r in self.rows)

    def generate_next_token(self) -> np.ndarray:
        """Run one model step (the prefill on the first call); return the token picked for
        each row ([batch] int64, -1 for rows that had already finished)."""
        t0 = time.perf_counter()
        if not self._started:
            self.cache.reset()
            logits = self.cache.prefill([r.prompt_ids for r in self.rows])
            self._started = True
            picked = self._pick(logits)
            self.timings.prefill_ms = (time.perf_counter() - t0) * 1e3
        else:
            if self.is_done():
                raise RuntimeError("generation is done; start a new Generator")
            logits = self.cache.decode(self._last, self._active)
            picked = self._pick(logits)
            self.timings.decode_ms.append((time.perf_counter() - t0) * 1e3)
        return picked

    def _pick(self, logits: np.ndarray) -> np.ndarray:
        """[batch, vocab] -> [batch] next tokens; updates each row."""
        if self._all_plain_greedy:
            greedy = getattr(self.cache, "greedy_tokens", None)
            chosen = greedy() if greedy is not None else np.argmax(logits, axis=-1)
        else:
            chosen = np.empty(len(self.rows), np.int64)
            for i, row in enumerate(self.rows):
                if row.done:
                    continue
                chosen[i] = self._pick_row(logits[i], row)
        picked = np.full(len(self.rows), -1, np.int64)
        for i, row in enumerate(self.rows):
            if row.done:
                continue
            token = int(chosen[i])
            picked[i] = token
            self._last[i] = token
            self._advance(row, token)
            if row.done:
                self._active[i] = False
        return picked

    def _pick_row(self, logits: np.ndarray, row: Row) -> int:
        p = row.params
        if p.repetition_penalty != 1.0:
            logits = logits.copy()  # the bound logits buffer is reused by the next step
            apply_repetition_penalty(logits, np.fromiter(row.seen, np.int64), p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        assert row.rng is not None
        return sample_token(logits, p, row.rng)

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
        end = len(row.text)
        if not row.done and row.params.stop:
            end -= _stop_prefix_len(row.text, row.params.stop)
        piece = row.text[row.emitted:end]
        row.emitted = max(row.emitted, end)
        return piece


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
