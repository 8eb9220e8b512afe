"""Pick the next token of every row in a batch, as transformers' logits processors would.

Per row, in the order of transformers' ``generate``:

1. repetition penalty over the prompt + generated ids (CTRL-style, as transformers),
2. frequency / presence penalty over the generated ids only (OpenAI semantics, counted as
   vLLM does; transformers has no such processor, so they sit right after (1)),
3. min_tokens: EOS gets -inf until ``min_tokens`` new tokens exist,
4. sampled rows only: temperature, top-k, top-p, min-p, then one draw from the row's own
   seeded generator. Greedy rows take the argmax of the result of 1-3 (transformers' greedy
   search runs the processors but not the warpers, which could not move the argmax).

After the sparse penalties, which are gathered into one fancy-indexed update per kind,
everything is vectorised over the rows with per-row parameter arrays (as vLLM's sampler takes
per-request tensors), and nothing sorts the whole vocabulary in the common case:

* top-k, top-p and min-p are each a threshold on the row's scaled logits, so the kept set is
  one comparison. top-k's is the k-th largest value (``np.partition`` + a sort of k values).
  top-p's comes from the cumulative mass of the row's K largest values: K is
  ``_TOP_P_CANDIDATES``, then ``_TOP_P_WIDE`` for rows whose K values hold too little, then
  the whole vocabulary (a full sort) for flat rows only. min-p keeps p >= min_p * p_max,
  i.e. exp(s - max(s)) >= min_p.
* Ties: top-k keeps every token equal to the k-th value (as transformers does); top-p keeps
  every token equal to the last one of the nucleus (transformers' unstable sort splits such
  ties arbitrarily).
* The draw is an inverse CDF over the kept tokens **in token-id order**: with u uniform in
  [0, 1) from the row's generator, the token is the first id whose cumulative weight exceeds
  u * total. Block sums find the block and a cumsum of that one block finds the id, which is
  cheaper than a cumsum of the whole vocabulary.
* The [rows, vocab] work arrays live in per-thread buffers reused across calls: fresh ones
  page-fault on every call once glibc hands freed memory back to the kernel (measured: ~3,900
  faults, about +10 ms, per 16-row top-p call).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from gpt2onnx.runtime.params import GenerationParams

# Candidate-set sizes for top-p. A trained LM's nucleus at top_p ~0.9 is usually a few dozen
# to a few hundred tokens; partitioning for 256 costs about what partitioning for 8 does.
_TOP_P_CANDIDATES = 256
_TOP_P_WIDE = 4096
# Tokens per block of the inverse CDF: ~200 blocks for GPT-2's vocabulary, then one block.
_CDF_BLOCK = 256


class _Scratch(threading.local):
    """Per-thread work buffers, grown to the largest batch seen and kept."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, int], dtype: type) -> np.ndarray:
        """An uninitialised array of ``shape`` backed by the buffer ``name``.

        The caller owns it until its next ``get`` of the same name (in this thread).
        """
        size = shape[0] * shape[1]
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = np.empty(size, dtype=dtype)
            self.buffers[name] = buf
        return buf[:size].reshape(shape)


_SCRATCH = _Scratch()


class RowSampler:
    """The sampling state of one row, built once from its parameters.

    Holds the row's generator (``np.random.default_rng(params.seed)``), the set of prompt +
    generated ids (repetition penalty, prompt included as in transformers), the counts of the
    generated ids (frequency/presence penalty, prompt excluded as in vLLM) and how many tokens
    were generated (min_tokens).

    Args:
        params: the row's validated generation parameters.
        prompt_ids: the row's prompt token ids, as fed to the model.
        eos_token_id: the model's EOS id, or None if it has none (min_tokens is then a no-op).
    """

    def __init__(self, params: GenerationParams, prompt_ids: Sequence[int],
                 eos_token_id: int | None) -> None:
        self.params = params
        self.eos_token_id = None if eos_token_id is None else int(eos_token_id)
        self.rng = np.random.default_rng(params.seed)
        self.seen: set[int] = {int(t) for t in prompt_ids}
        self.counts: dict[int, int] = {}
        self.generated = 0
        # Array views of `seen` / `counts`, rebuilt only after they change.
        self._seen_ids: np.ndarray | None = None
        self._count_ids: tuple[np.ndarray, np.ndarray] | None = None
        self._repetition = params.repetition_penalty != 1.0
        self._frequency_presence = (params.frequency_penalty != 0.0
                                    or params.presence_penalty != 0.0)

    @property
    def sampled(self) -> bool:
        """True when the row draws (temperature > 0); False for greedy rows."""
        return self.params.temperature > 0.0

    @property
    def blocks_eos(self) -> bool:
        """True while min_tokens forbids EOS (the model has one, too few tokens so far)."""
        return self.eos_token_id is not None and self.generated < self.params.min_tokens

    @property
    def plain_greedy(self) -> bool:
        """True when the pick is the raw argmax, so the device's argmax can be used.

        Temperature 0 and no processor that can move the argmax: no repetition, frequency or
        presence penalty, and min_tokens not (or no longer) blocking EOS. It may turn True
        during generation, once min_tokens tokens exist.
        """
        return (self.params.temperature == 0.0 and not self._repetition
                and not self._frequency_presence and not self.blocks_eos)

    def observe(self, token: int) -> None:
        """Record one generated token (call once per step, after ``pick_tokens``).

        Args:
            token: the id generated for this row.
        """
        token = int(token)
        self.generated += 1
        if token not in self.seen:
            self.seen.add(token)
            self._seen_ids = None
        self.counts[token] = self.counts.get(token, 0) + 1
        self._count_ids = None

    def draw(self) -> float:
        """The next uniform in [0, 1) from the row's generator (sampled rows only)."""
        return float(self.rng.random())

    def seen_ids(self) -> np.ndarray:
        """[n_seen] int64: the distinct prompt + generated ids (repetition penalty)."""
        if self._seen_ids is None:
            self._seen_ids = np.fromiter(self.seen, np.int64, len(self.seen))
        return self._seen_ids

    def generated_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """([n_distinct] int64 ids, [n_distinct] float32 counts) of the generated tokens."""
        if self._count_ids is None:
            self._count_ids = (np.fromiter(self.counts.keys(), np.int64, len(self.counts)),
                               np.fromiter(self.counts.values(), np.float32, len(self.counts)))
        return self._count_ids


def pick_tokens(logits: np.ndarray, samplers: Sequence[RowSampler],
                greedy_ids: np.ndarray | None = None) -> np.ndarray:
    """Choose the next token of every row.

    Args:
        logits: [rows, vocab] float32 last-position logits. Often a bound output buffer, so it
            is never written: only the rows that need processing are copied.
        samplers: one RowSampler per row, in row order.
        greedy_ids: optional [rows] int64 argmax computed on the device; used for the rows
            whose sampler is ``plain_greedy`` (other entries are ignored).

    Returns:
        [rows] int64 chosen ids. Draws one uniform from each sampled row's generator; does not
        call ``observe`` (the caller does, once it keeps the token).
    """
    logits = np.asarray(logits)
    rows = _check_batch(logits, samplers)
    picked = np.empty(rows, dtype=np.int64)
    plain = np.fromiter((s.plain_greedy for s in samplers), dtype=bool, count=rows)

    plain_rows = np.flatnonzero(plain)
    if plain_rows.size:
        if greedy_ids is not None:
            greedy_ids = np.asarray(greedy_ids).reshape(-1)
            if greedy_ids.shape[0] != rows:
                raise ValueError(f"greedy_ids has {greedy_ids.shape[0]} entries for {rows} rows")
            picked[plain_rows] = greedy_ids[plain_rows]
        else:
            # Row by row: argmax reads the buffer in place, where logits[plain_rows] would copy.
            for i in plain_rows:
                picked[i] = logits[i].argmax()

    busy = np.flatnonzero(~plain)
    if busy.size == 0:
        return picked
    scores = _penalised(logits, samplers, busy)  # [busy, vocab] float32, a copy
    sampled = np.fromiter((samplers[i].sampled for i in busy), dtype=bool, count=busy.size)
    if not sampled.all():
        # Greedy with processors: argmax of the processed scores, as transformers' greedy.
        picked[busy[~sampled]] = scores[~sampled].argmax(axis=1)
    if sampled.any():
        drawn = busy[sampled]
        s = scores if sampled.all() else scores[sampled]  # [drawn, vocab]
        u = np.fromiter((samplers[i].draw() for i in drawn), dtype=np.float64, count=drawn.size)
        weights = _sampling_weights(s, [samplers[i].params for i in drawn])
        picked[drawn] = _inverse_cdf(weights, u)
    return picked


def processed_logprobs(logits: np.ndarray, samplers: Sequence[RowSampler]) -> np.ndarray:
    """The log-distribution ``pick_tokens`` uses for each row, without drawing.

    Sampled rows: log of the distribution the draw comes from (after every processor and
    warper; -inf outside the kept set). Greedy rows: log_softmax of the scores after the
    penalties and min_tokens (no temperature or truncation); its argmax is the pick.

    Args:
        logits: [rows, vocab] float32 last-position logits (not modified).
        samplers: one RowSampler per row, in row order.

    Returns:
        [rows, vocab] float32 log-probabilities.
    """
    logits = np.asarray(logits)
    rows = _check_batch(logits, samplers)
    scores = _penalised(logits, samplers, np.arange(rows))  # [rows, vocab]
    out = np.empty(scores.shape, dtype=np.float32)
    sampled = np.fromiter((s.sampled for s in samplers), dtype=bool, count=rows)
    if not sampled.all():
        out[~sampled] = log_softmax(scores[~sampled])
    if sampled.any():
        weights = _sampling_weights(scores[sampled],
                                    [samplers[i].params for i in np.flatnonzero(sampled)])
        with np.errstate(divide="ignore"):
            out[sampled] = np.log(weights / weights.sum(axis=1, keepdims=True))
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[..., vocab] -> log-probabilities, numerically stable."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _check_batch(logits: np.ndarray, samplers: Sequence[RowSampler]) -> int:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {logits.shape}")
    if logits.shape[0] != len(samplers):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(samplers)} samplers")
    return logits.shape[0]


def _penalised(logits: np.ndarray, samplers: Sequence[RowSampler], rows: np.ndarray
               ) -> np.ndarray:
    """A float32 copy of ``logits[rows]`` with repetition, frequency/presence and min_tokens.

    Each row's ids are sparse and differ per row, so the Python loop only gathers (row, id)
    pairs; each penalty is then one fancy-indexed update over all rows.
    """
    scores = _SCRATCH.get("scores", (rows.size, logits.shape[1]), np.float32)  # [rows, vocab]
    if logits.dtype == np.float32:
        np.take(logits, rows, axis=0, out=scores)
    else:
        scores[...] = logits[rows]
    rep_at: list[np.ndarray] = []
    rep_ids: list[np.ndarray] = []
    rep_by: list[np.ndarray] = []
    fp_at: list[np.ndarray] = []
    fp_ids: list[np.ndarray] = []
    fp_by: list[np.ndarray] = []
    eos_at: list[int] = []
    eos_ids: list[int] = []
    for j, i in enumerate(rows):
        sampler = samplers[i]
        p = sampler.params
        if sampler._repetition:
            ids = sampler.seen_ids()
            rep_at.append(np.full(ids.size, j))
            rep_ids.append(ids)
            rep_by.append(np.full(ids.size, p.repetition_penalty, dtype=np.float32))
        if sampler._frequency_presence and sampler.counts:
            ids, counts = sampler.generated_counts()
            fp_at.append(np.full(ids.size, j))
            fp_ids.append(ids)
            fp_by.append(counts * np.float32(p.frequency_penalty)
                         + np.float32(p.presence_penalty))
        if sampler.blocks_eos:
            eos_at.append(j)
            eos_ids.append(sampler.eos_token_id)  # type: ignore[arg-type]
    if rep_at:
        at, ids, by = np.concatenate(rep_at), np.concatenate(rep_ids), np.concatenate(rep_by)
        vals = scores[at, ids]
        # CTRL: dividing a negative logit would raise it, so negatives are multiplied.
        scores[at, ids] = np.where(vals < 0, vals * by, vals / by)
    if fp_at:
        at, ids = np.concatenate(fp_at), np.concatenate(fp_ids)
        # ids are distinct within a row, so no two updates hit the same cell.
        scores[at, ids] -= np.concatenate(fp_by)
    if eos_at:
        scores[eos_at, eos_ids] = -np.inf
    return scores


def _sampling_weights(scores: np.ndarray, params: Sequence[GenerationParams]) -> np.ndarray:
    """Temperature, top-k, top-p and min-p over the rows, as unnormalised probabilities.

    Args:
        scores: [n, vocab] float32 penalised logits of sampled rows; divided in place.
        params: the n rows' parameters.

    Returns:
        [n, vocab] float32 weights exp(s - max(s)) on the kept tokens, 0 elsewhere.
    """
    n = scores.shape[0]
    temperature = np.fromiter((p.temperature for p in params), dtype=np.float32, count=n)
    top_k = np.fromiter((p.top_k for p in params), dtype=np.int64, count=n)
    top_p = np.fromiter((p.top_p for p in params), dtype=np.float64, count=n)
    min_p = np.fromiter((p.min_p for p in params), dtype=np.float32, count=n)

    scores /= temperature[:, None]  # [n, vocab] scaled logits
    top = scores.max(axis=1)  # [n]
    weights = np.subtract(scores, top[:, None])  # [n, vocab]
    np.exp(weights, out=weights)  # 1 at each row's argmax
    threshold = _truncation_thresholds(scores, weights, top, top_k, top_p)  # [n]
    use_min_p = min_p > 0
    if np.isfinite(threshold).any() or use_min_p.any():
        keep = scores >= threshold[:, None]  # [n, vocab]
        if use_min_p.any():
            # min-p keeps p >= min_p * p_max; with weights = p / p_max that is weights >= min_p.
            keep &= weights >= min_p[:, None]
        weights *= keep
    return weights


def _truncation_thresholds(scores: np.ndarray, weights: np.ndarray, top: np.ndarray,
                           top_k: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Per row, the smallest scaled logit that top-k and then top-p keep (-inf: keep all).

    top-k, and top-p when its nucleus lies within the ``_TOP_P_CANDIDATES`` largest values
    (the common case), come from one partition of the rows. A flat row's top-p cut is found
    by sorting only a band of values around an estimate (``_nucleus_band``); only if that
    misses does the row get a full sort.

    Args:
        scores: [n, vocab] scaled logits.
        weights: [n, vocab] exp(scores - top).
        top: [n] row maxima of ``scores``.
        top_k: [n] top-k per row (0 = off).
        top_p: [n] top-p per row (1 = off).

    Returns:
        [n] float32 thresholds: a token is kept iff its scaled logit >= the threshold.
    """
    n, vocab = scores.shape
    threshold = np.full(n, -np.inf, dtype=np.float32)
    use_k = (top_k > 0) & (top_k < vocab)
    use_p = top_p < 1.0
    todo = np.flatnonzero(use_k | use_p)
    if todo.size == 0:
        return threshold
    size = int(top_k[use_k].max(initial=0))
    if use_p.any():
        size = max(size, _TOP_P_CANDIDATES)
    size = min(size, vocab)
    cand = _largest(scores, todo, size)  # [todo, size] ascending

    # top-k: transformers removes scores < the k-th largest, so ties with it stay.
    kth = np.full(n, -np.inf, dtype=np.float32)
    k_local = np.flatnonzero(use_k[todo])
    kth[todo[k_local]] = cand[k_local, size - top_k[todo[k_local]]]
    threshold[todo] = kth[todo]

    p_local = use_p[todo]
    todo, cand = todo[p_local], cand[p_local]
    if todo.size == 0:
        return threshold
    # top-p normalises over what top-k left: [todo] total weight of each row's top-k set.
    mass = _rows(weights, todo).sum(axis=1).astype(np.float64)
    both = np.flatnonzero(use_k[todo])
    if both.size:
        at = todo[both]
        mass[both] = (weights[at] * (scores[at] >= kth[at, None])).sum(axis=1)
    target = top_p[todo] * mass  # [todo] the nucleus holds at least this much
    cut, done, cand_mass = _cut_in_candidates(cand, top[todo], kth[todo], target, mass)
    # With top-k on, size >= k: all that can lie below the candidates are ties with the k-th.
    done |= (size == vocab) | use_k[todo]
    threshold[todo[done]] = np.maximum(kth[todo[done]], cut[done])
    left = ~done
    if not left.any():
        return threshold
    if not _BAND_STRIDE:
        todo = todo[left]
        cut, _, _ = _cut_in_candidates(_largest(scores, todo, vocab), top[todo],
                                       kth[todo], target[left], mass[left])
        threshold[todo] = cut
        return threshold

    todo, target, mass = todo[left], target[left], mass[left]
    cut, done = _nucleus_band(scores, weights, top, todo, cand[left, 0], cand_mass[left],
                              target, mass)
    threshold[todo[done]] = cut[done]
    todo, target, mass = todo[~done], target[~done], mass[~done]
    if todo.size:
        # The band missed (a row neither flat nor peaked enough): sort the whole row.
        cut, _, _ = _cut_in_candidates(_largest(scores, todo, vocab), top[todo],
                                       kth[todo], target, mass)
        threshold[todo] = cut
    return threshold


def _cut_in_candidates(cand: np.ndarray, top: np.ndarray, kth: np.ndarray, target: np.ndarray,
                       mass: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """top-p's cut among each row's largest values.

    Args:
        cand: [r, size] each row's largest scaled logits, ascending.
        top: [r] row maxima.
        kth: [r] top-k thresholds (-inf: off); candidates below weigh nothing.
        target: [r] top_p * mass.
        mass: [r] the rows' total weight after top-k.

    Returns:
        ([r] float32 cut, [r] bool found within the candidates, [r] float64 candidates' mass).
    """
    # The same float32 exp as `weights`, so these equal the rows' entries.
    w = np.subtract(cand, top[:, None])  # [r, size]
    np.exp(w, out=w)
    if np.isfinite(kth).any():
        w *= cand >= kth[:, None]
    inside = w.sum(axis=1, dtype=np.float64)  # [r]
    # transformers drops tokens whose ascending cumulative probability is <= 1 - top_p (the
    # top token always stays). What the candidates may still drop is that budget less the
    # mass below them; if it is negative the nucleus reaches below them.
    budget = (mass - target) - (mass - inside)  # [r]
    found = budget >= 0
    # The first token kept, in ascending order: its cumulative weight exceeds the budget.
    first, hit = _first_cumulative(w, np.maximum(budget, 0.0), strict=True)
    first = np.where(hit, first, cand.shape[1] - 1)
    cut = np.minimum(cand[np.arange(cand.shape[0]), first], top)  # keep the top token
    return cut, found, inside


def _nucleus_band(scores: np.ndarray, weights: np.ndarray, top: np.ndarray, rows: np.ndarray,
                  cand_min: np.ndarray, cand_mass: np.ndarray, target: np.ndarray,
                  mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """top-p's cut for rows whose nucleus reaches below their candidates (flat rows).

    Estimates the mass at or above each value of a strided sample (exact above the
    candidates, sampled below), brackets the cut by [lo, hi] with a margin, checks the
    bracket exactly, and sorts only the values inside it.

    Args:
        scores, weights, top: as in ``_truncation_thresholds`` (all rows).
        rows: [r] the rows to cut (no top-k).
        cand_min: [r] the smallest candidate of each row; cand_mass: [r] the candidates' mass.
        target: [r] top_p * mass; mass: [r] the rows' total weight.

    Returns:
        ([r] float32 cut, [r] bool found); rows not found need a full sort.
    """
    r = rows.size
    at = np.arange(r)
    sample = np.sort(scores[rows, ::_BAND_STRIDE], axis=1)  # [r, m] ascending
    m = sample.shape[1]
    below = np.exp(sample - top[rows, None]) * (sample < cand_min[:, None])  # [r, m]
    # est[:, i]: estimated mass of the values >= sample[:, i]; decreasing in i.
    est = cand_mass[:, None] + _BAND_STRIDE * np.cumsum(below[:, ::-1], axis=1)[:, ::-1]
    # hi: the lowest sample value whose estimate stays below target - margin (else the
    # candidates' minimum); lo: the highest whose estimate reaches target + margin (else -inf).
    i_hi = (est > (target - _BAND_MARGIN * mass)[:, None]).sum(axis=1)
    n_lo = (est >= (target + _BAND_MARGIN * mass)[:, None]).sum(axis=1)
    hi = np.where(i_hi < m, sample[at, np.minimum(i_hi, m - 1)], cand_min)  # [r]
    lo = np.where(n_lo > 0, sample[at, np.maximum(n_lo - 1, 0)], -np.inf)  # [r]

    sub, wsub = _rows(scores, rows), _rows(weights, rows)  # [r, vocab]
    above = (wsub * (sub > hi[:, None])).sum(axis=1).astype(np.float64)  # [r] exact
    band = (sub >= lo[:, None]) & (sub <= hi[:, None])  # [r, vocab]
    counts = band.sum(axis=1)
    ends = np.cumsum(counts)
    starts = ends - counts
    vals = sub.ravel()[np.flatnonzero(band)]  # row-major: each row's band is contiguous
    if vals.size == 0:
        return np.zeros(r, dtype=np.float32), np.zeros(r, dtype=bool)
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        vals[a:b].sort()  # ascending within the row's band
    owner = np.repeat(at, counts)
    # cum[i]: weight of the first i band values (all rows in a row); the same float32 exp.
    cum = np.zeros(vals.size + 1)
    np.cumsum(np.exp(vals - top[rows][owner]), dtype=np.float64, out=cum[1:])
    # The band value at index i is the nucleus's last iff the mass at or above it,
    # above + cum[end] - cum[i], reaches the target: the highest such i.
    i = np.searchsorted(cum, cum[ends] + above - target, side="right") - 1
    found = (above < target) & (counts > 0) & (i >= starts)
    cut = vals[np.clip(i, 0, vals.size - 1)]
    return np.minimum(cut, top[rows]).astype(np.float32), found


def _rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``a[rows]`` for sorted distinct ``rows``; ``a`` itself (no copy) when that is every row."""
    return a if rows.size == a.shape[0] else a[rows]


def _largest(scores: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """[len(rows), size]: the ``size`` largest values of each of ``rows``, ascending."""
    vocab = scores.shape[1]
    sub = scores[rows]  # a copy, so sorting in place leaves ``scores`` intact
    if size >= vocab:
        sub.sort(axis=1)
        return sub
    # O(vocab) selection; only the `size` selected values are sorted. Ascending (not
    # reversed) keeps the result contiguous for the block sums.
    sub.partition(vocab - size, axis=1)
    return np.sort(sub[:, vocab - size:], axis=1)


def _inverse_cdf(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, the first token id whose cumulative weight exceeds u * total.

    Args:
        weights: [n, vocab] non-negative, each row with a positive entry.
        u: [n] uniforms in [0, 1).

    Returns:
        [n] int64 token ids, each with positive weight.
    """
    picked, found = _first_cumulative(weights, u, strict=True, of_total=True)
    # u * total rounded up to (or past) the summed blocks: the last kept token. Rare.
    for r in np.flatnonzero(~found):
        picked[r] = np.flatnonzero(weights[r] > 0)[-1]
    return picked


def _first_cumulative(w: np.ndarray, target: np.ndarray, strict: bool,
                      of_total: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first index whose inclusive cumulative weight passes the target.

    Blocked so that no full-width cumsum is needed (a cumsum over 50k entries costs several
    times a sum): block sums locate the block, then one cumsum of that block the index.

    Args:
        w: [n, size] non-negative weights, C-contiguous rows.
        target: [n] float64 targets (>= 0), or fractions of the row's sum if ``of_total``.
        strict: pass means ``>`` (inverse CDF) rather than ``>=``.
        of_total: ``target`` holds fractions of each row's total weight.

    Returns:
        ([n] int64 indices, [n] bool found). Not found: the row's whole sum does not pass
        its target, and the index is meaningless. A found index has positive weight unless
        the target is 0 and not strict.
    """
    n, size = w.shape
    block = min(_CDF_BLOCK, size)
    n_full = size // block
    n_blocks = -(-size // block)
    sums = np.empty((n, n_blocks), dtype=np.float64)  # [n, blocks] weight per block
    sums[:, :n_full] = w[:, :n_full * block].reshape(n, n_full, block).sum(axis=2)
    if n_blocks > n_full:
        sums[:, n_full] = w[:, n_full * block:].sum(axis=1)
    cum = np.cumsum(sums, axis=1)  # [n, blocks]
    if of_total:
        target = target * cum[:, -1]
    short = np.less_equal if strict else np.less  # "has not passed the target yet"
    b = short(cum, target[:, None]).sum(axis=1)  # [n] first block that passes
    found = b < n_blocks
    b = np.minimum(b, n_blocks - 1)
    rows = np.arange(n)
    left = target - np.where(b > 0, cum[rows, b - 1], 0.0)  # [n] target within block b
    cols = b[:, None] * block + np.arange(block)  # [n, block]
    inside = cols < size
    chunk = np.where(inside, w[rows[:, None], np.minimum(cols, size - 1)], 0.0)  # [n, block]
    c = np.cumsum(chunk, axis=1)  # float64
    j = short(c, left[:, None]).sum(axis=1)  # [n]
    # The block passes but its own cumsum rounds just short: its last positive entry.
    for r in np.flatnonzero(found & (j >= block)):
        positive = np.flatnonzero(chunk[r] > 0)
        j[r] = positive[-1] if positive.size else 0
    return b * block + j, found
