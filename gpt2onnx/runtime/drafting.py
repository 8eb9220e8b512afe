"""Drafters for speculative decoding: cheap guesses at a row's next tokens, which the
target model then checks in one step (``gpt2onnx.runtime.speculative``).

Two kinds, one interface:

* ``NgramDrafter`` (prompt lookup): the row's newest n-gram (n from ``max_n`` down to
  ``min_n``) is looked up in everything earlier in the row, prompt and output; the tokens
  that followed its latest earlier occurrence are the draft. Costs microseconds and pays
  where the output copies its input (quoting, editing code, summaries that reuse phrases,
  a model stuck in a loop).
* ``ModelDrafter``: another model folder with the same tokenizer (a smaller GPT-2, or an
  int8 / int4 export of the target's own checkpoint) runs k one-token steps through its
  own cache; that cache is rewound with the target's.

A draft for a sampled row carries the distribution each token was drawn from, since the
acceptance rule needs it; an n-gram draft is deterministic (all mass on its token).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpt2onnx.errors import InvalidParameterError, ModelFolderError
from gpt2onnx.runtime.cache import Append, StepResult
from gpt2onnx.runtime.folder import SPIN_RUN, spin_from_env
from gpt2onnx.runtime.sampling import RowSampler, processed_logprobs
from gpt2onnx.runtime.speculative import inverse_cdf

if TYPE_CHECKING:
    from gpt2onnx.runtime.model import Model

NGRAM = "ngram"
MAX_NGRAM = 8


@dataclass
class DraftRequest:
    """What a drafter needs to guess one row's next tokens.

    Args:
        slot: the row's cache slot (a ``ModelDrafter`` keeps its own cache per slot).
        context: the row's prompt + generated ids; the last one is not in any cache yet.
        k: tokens wanted (at least 1).
        sampler: a sampled row's sampler (drafts are drawn), or None for greedy rows.
    """

    slot: int
    context: np.ndarray
    k: int
    sampler: RowSampler | None


@dataclass
class Draft:
    """Proposed tokens and, for a drawn draft, the distributions they came from."""

    tokens: np.ndarray  # [k'] int64, k' <= the k asked for (0: nothing to propose)
    probs: np.ndarray | None = None  # [k', vocab] float32, or None: deterministic


class Drafter:
    """Interface: ``propose`` drafts for some rows; ``accepted`` after each verification;
    ``release`` when a slot's row leaves; ``close`` when the generator is done."""

    kind = "none"

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        raise NotImplementedError

    def accepted(self, slot: int, length: int) -> None:
        """The first ``length`` tokens of the row's context are settled (its accepted
        tokens; the target's next input is not among them)."""

    def release(self, slot: int) -> None:
        """The slot's row is gone."""

    def close(self) -> None:
        """The generator is done."""


class NgramDrafter(Drafter):
    """Prompt lookup: propose what followed the row's newest n-gram the last time it
    occurred earlier in the row.

    Args:
        max_n / min_n: n-gram sizes tried, longest first (1 <= min_n <= max_n <= 8).
            A longer match predicts better; min_n 1 drafts more often and is wrong more.
    """

    kind = NGRAM

    def __init__(self, max_n: int = 3, min_n: int = 2) -> None:
        for name, value in (("ngram_max", max_n), ("ngram_min", min_n)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NGRAM:
                raise InvalidParameterError(name, f"{name} must be an integer in "
                                            f"[1, {MAX_NGRAM}], got {value!r}.")
        if min_n > max_n:
            raise InvalidParameterError("ngram_min", f"ngram_min ({min_n}) must be <= "
                                        f"ngram_max ({max_n}).")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [Draft(lookup(r.context, r.k, self.max_n, self.min_n)) for r in requests]


def lookup(context: np.ndarray, k: int, max_n: int, min_n: int) -> np.ndarray:
    """Up to ``k`` tokens that followed an earlier occurrence of the context's final
    n-gram, for the longest n in [min_n, max_n] that has one; empty if none.

    The occurrence is the latest one followed by k tokens, else the latest: in a loop of
    period P the latest is P tokens back and followed by only P tokens, while the text
    repeats further than that.
    """
    size = context.shape[0]
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        # Windows that start early enough to be followed by a token, the final n-gram
        # itself excluded: [size - n, n].
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)
        hits = np.flatnonzero((windows == context[size - n:]).all(axis=1))
        if hits.size:
            full = hits[hits + n + k <= size]
            start = int(full[-1] if full.size else hits[-1]) + n
            return context[start:start + k].astype(np.int64, copy=True)
    return np.zeros(0, np.int64)


class ModelDrafter(Drafter):
    """A smaller (or lower-precision) model folder guesses, one token per step, through
    its own cache of the generator's batch size.

    Args:
        draft: the draft model (fused layout, same tokenizer and vocabulary as the target).
        target: the target model, to check the draft against.
        batch_size: slots, as the target generator's.
    """

    kind = "draft"

    def __init__(self, draft: Model, target: Model, batch_size: int) -> None:
        check_draft(draft, target)
        if draft.spinning is True and target.spinning is True and target.provider == "cpu":
            warnings.warn(
                "the draft and the target Model both spin their onnxruntime threads, which "
                "then compete for the same cores (measured: no speed-up left); load both "
                "with spinning='run' (fastest) or the draft with spinning=False.",
                RuntimeWarning, stacklevel=4)
        self.model = draft
        self.cache = draft.cache(batch_size)
        self._samplers: dict[int, RowSampler] = {}
        self._settled: dict[int, int] = {}  # per slot: leading context tokens known good

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        cache = self.cache
        tokens = [np.zeros(r.k, np.int64) for r in requests]
        probs: list[np.ndarray | None] = [
            np.zeros((r.k, cache.vocab), np.float32) if r.sampler is not None else None
            for r in requests]
        # First the tokens the draft has not seen (the settled ones since its last draft,
        # and the target's next input), then one token per step.
        appends = []
        for r in requests:
            # Only what verification settled counts: a draft run that failed half-way may
            # have left guesses behind.
            have = min(int(cache.lengths[r.slot]), self._settled.get(r.slot, 0))
            cache.rewind(r.slot, have)
            appends.append(Append(r.slot, r.context[have:], keep=1))
        live = list(range(len(requests)))
        j = 0
        while True:
            result = self.cache.step(appends)
            for i, k in enumerate(live):
                tokens[k][j] = self._pick(requests[k], result, i, probs[k], j)
            j += 1
            live = [k for k in live if requests[k].k > j]
            if not live:
                break
            # The last draft token is not appended: the target verifies it first.
            appends = [Append(requests[k].slot, tokens[k][j - 1:j]) for k in live]
        return [Draft(t, p) for t, p in zip(tokens, probs, strict=True)]

    def _pick(self, request: DraftRequest, result: StepResult, i: int,
              probs: np.ndarray | None, j: int) -> int:
        if request.sampler is None:
            return int(result.argmax(i)[-1])
        sampler = self._samplers.get(request.slot)
        if sampler is None:
            # The row's temperature and truncation without penalties (any draft
            # distribution keeps the output exact, as long as each token is drawn from the
            # one reported), and a generator of its own: drafting must not shift the
            # target's seeded draws.
            p = request.sampler.params
            params = replace(p, repetition_penalty=1.0, frequency_penalty=0.0,
                             presence_penalty=0.0, min_tokens=0, logprobs=None,
                             prompt_logprobs=None,
                             seed=None if p.seed is None else (p.seed * 1_000_003 + 17) % 2 ** 63)
            sampler = self._samplers[request.slot] = RowSampler(params, [], None)
        assert probs is not None
        probs[j] = np.exp(processed_logprobs(result.logits(i)[-1:], [sampler])[0])
        # Drawn from exactly the distribution reported, which the acceptance rule divides by.
        return inverse_cdf(probs[j], sampler.draw())

    def accepted(self, slot: int, length: int) -> None:
        have = min(int(self.cache.lengths[slot]), length)
        self.cache.rewind(slot, have)
        self._settled[slot] = have

    def release(self, slot: int) -> None:
        self.cache.release(slot)
        self._samplers.pop(slot, None)
        self._settled.pop(slot, None)

    def close(self) -> None:
        if self.cache is not None:
            self.model._return_cache(self.cache)
            self.cache = None  # type: ignore[assignment]  # closed: propose would fail


def target_spinning(spinning: bool | str | None, with_draft: bool) -> bool | str | None:
    """How a target model spins: as asked (None: GPT2ONNX_SPIN, else on), except that
    with a draft model full spinning becomes ``"run"``, so that the two sessions leave
    the cores to each other between runs. Without a draft, None stays None (the session
    reads the variable itself)."""
    if not with_draft:
        return spinning
    if spinning is None:
        spinning = spin_from_env()
    return SPIN_RUN if spinning is True else spinning


def draft_spinning(target: Model) -> bool | str:
    """How a draft loaded for ``target`` spins. Two sessions taking turns on the same
    cores must not spin between runs: with the target on "run" the draft spins within its
    runs too (fastest, measured 6.5-7 ms/token for fp32 + int8 draft); with a target that
    spins fully, the draft's threads sleep (1.0x with both spinning, 1.6-1.7x so)."""
    return SPIN_RUN if target.spinning == SPIN_RUN else False


def check_draft(draft: Model, target: Model) -> None:
    """Refuse a draft that cannot propose tokens the target reads the same way."""
    d, t = draft.manifest, target.manifest
    where = f"draft folder {draft.folder}"
    if d.layout != "fused":
        raise ModelFolderError(f"{where} has the {d.layout} layout; a draft needs the fused "
                               "layout (its cache is rewound per row). Re-export it with "
                               "--layout fused.")
    if d.vocab_size != t.vocab_size:
        raise ModelFolderError(f"{where} has a vocabulary of {d.vocab_size} tokens, the "
                               f"target {t.vocab_size}; use a draft of the same model family "
                               "(same tokenizer).")
    if draft.vocab_digest != target.vocab_digest:
        raise ModelFolderError(f"{where} has a different tokenizer than the target "
                               f"{target.folder}; its token ids would mean other text. Use a "
                               "draft exported from a checkpoint with the target's tokenizer.")
    if d.eos_token_id != t.eos_token_id:
        raise ModelFolderError(f"{where} has EOS id {d.eos_token_id}, the target "
                               f"{t.eos_token_id}; use a draft with the target's tokenizer.")
    if draft.context_length < target.context_length:
        raise ModelFolderError(
            f"{where} holds {draft.context_length} tokens, the target {target.context_length}; "
            f"re-export the draft with --max-length {target.context_length} or more.")


def resolve_drafter(draft: object, target: Model, batch_size: int) -> Drafter | None:
    """``None``, ``"ngram"``, a ``Model`` or a folder path -> a drafter (or None)."""
    from gpt2onnx.runtime.model import Model

    if draft is None:
        return None
    if isinstance(draft, ModelDrafter):
        raise InvalidParameterError(
            "draft", "a ModelDrafter holds one generator's draft cache; pass the draft Model "
            "(or its folder) and each generator makes its own.")
    if isinstance(draft, Drafter):
        return draft
    if isinstance(draft, str) and draft == NGRAM:
        return NgramDrafter()
    if isinstance(draft, (str, Path)):
        path = Path(draft)
        if not (path / "manifest.json").is_file():
            raise InvalidParameterError(
                "draft", f"draft {str(draft)!r} is neither 'ngram' nor a model folder (no "
                "manifest.json there); pass 'ngram' or a folder written by gpt2onnx.export.")
        # Loaded once per target and folder (a session costs a load), with threads that
        # leave the cores to the target's between runs (see draft_spinning).
        key = str(path.resolve())
        with target._idle_lock:
            loaded = target._drafts.get(key)
        if loaded is None:
            loaded = Model(path, provider=target.provider, spinning=draft_spinning(target))
            with target._idle_lock:
                loaded = target._drafts.setdefault(key, loaded)
        draft = loaded
    if isinstance(draft, Model):
        if target.manifest.layout != "fused":
            raise InvalidParameterError("draft", "speculative decoding needs a fused target "
                                        "folder (rows are rewound); re-export with --layout "
                                        "fused.")
        return ModelDrafter(draft, target, batch_size)
    raise InvalidParameterError("draft", f"draft must be 'ngram', a Model or a model folder "
                                f"path, got {type(draft).__name__}.")
