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
  u * total. Rows that keep few tokens (top-k, a peaked top-p, min-p) are drawn from those
  alone, all such rows through one ``flatnonzero``; the others (temperature alone, flat
  nuclei) from dense weights, where block sums find the block and a cumsum of that block the
  id (a cumsum over the whole vocabulary costs several times a sum).
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
# Rows whose first candidates hold this share of top_p's mass try _TOP_P_WIDE before a full
# sort. On random logits the share is ~0.1 for a 33k-token nucleus, ~0.98 for a 450-token one.
_WIDE_IF_HELD = 0.75
# Draws per nucleus row before its exact edge is computed (see _draw); each is kept with
# probability >= top_p, so at top_p 0.95 one row in 160,000 gets past four.
_TOP_P_TRIES = 4
# Rows keeping at most this many tokens are drawn from those alone; more, from dense weights.
_SPARSE_MAX = 4096
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
        # Greedy with no penalty: only min_tokens can still stand between it and the argmax.
        self._greedy_unpenalised = (params.temperature == 0.0 and not self._repetition
                                    and not self._frequency_presence)

    @property
    def sampled(self) -> bool:
        """True when the row draws (temperature > 0); False for greedy rows."""
        return self.params.temperature > 0.0

    @property
    def blocks_eos(self) -> bool:
        """True while min_tokens forbids EOS (the model has one, too few tokens so far)."""
        return self.eos_token_id is not None and self.generated < self.params.min_tokens

    @property
    def processes(self) -> bool:
        """True when a processor runs before the temperature: a penalty, or min_tokens
        blocking EOS."""
        return self._repetition or self._frequency_presence or self.blocks_eos

    @property
    def plain_greedy(self) -> bool:
        """True when the pick is the raw argmax, so the device's argmax can be used.

        Temperature 0 and no processor that can move the argmax: no repetition, frequency or
        presence penalty, and min_tokens not (or no longer) blocking EOS. It may turn True
        during generation, once min_tokens tokens exist.
        """
        return self._greedy_unpenalised and not self.blocks_eos

    @property
    def greedy_but_eos(self) -> bool:
        """True for a greedy row whose only processor is min_tokens blocking EOS: its pick
        is the device's argmax whenever that is not EOS (the argmax is the first maximum,
        so masking EOS cannot move it), and needs the logits only when it is."""
        return self._greedy_unpenalised and self.blocks_eos

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
    sampled = np.fromiter((samplers[i].sampled for i in busy), dtype=bool, count=busy.size)
    if sampled.all() and logits.dtype == np.float32 and all(
            _plain(samplers[i], logits.shape[1]) for i in busy):
        rows_logits = logits if busy.size == rows else logits[busy]
        picked[busy] = _draw_plain(rows_logits, [samplers[i] for i in busy])
        return picked
    scores = _penalised(logits, samplers, busy)  # [busy, vocab] float32, a scratch copy
    if not sampled.all():
        # Greedy with processors: argmax of the processed scores, as transformers' greedy.
        picked[busy[~sampled]] = scores[~sampled].argmax(axis=1)
    if sampled.any():
        drawn = busy[sampled]
        s = scores if sampled.all() else scores[sampled]  # [drawn, vocab]
        picked[drawn] = _draw(s, [samplers[i] for i in drawn])
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
        rows_params = [samplers[i].params for i in np.flatnonzero(sampled)]
        cut = _truncate(scores[sampled], rows_params)
        weights = _dense_weights(cut, np.arange(cut.scores.shape[0]))
        with np.errstate(divide="ignore"):
            out[sampled] = np.log(weights / weights.sum(axis=1, keepdims=True))
    return out


def top_ids(logp: np.ndarray, n: int) -> np.ndarray:
    """[rows, vocab] -> [rows, n] ids of the n largest entries, largest first (a partial
    selection, then a sort of the n)."""
    ids = np.argpartition(logp, -n, axis=-1)[:, -n:]
    order = np.argsort(-np.take_along_axis(logp, ids, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(ids, order, axis=-1)


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
    """``logits[rows]`` as float32 with repetition, frequency/presence and min_tokens applied.

    The result is the "scores" scratch buffer (``logits`` itself is never written). Each row's
    ids are sparse and differ per row, so the Python loop only gathers (row, id) pairs; each
    penalty is then one fancy-indexed update over all rows.
    """
    scores = _SCRATCH.get("scores", (rows.size, logits.shape[1]), np.float32)  # [rows, vocab]
    if logits.dtype == np.float32:
        np.take(logits, rows, axis=0, out=scores, mode="clip")  # "raise" would buffer
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


class _Truncation:
    """The scaled scores of some sampled rows and what temperature/top-k/top-p/min-p keep.

    A token j of row r is kept iff ``scores[r, j] >= lower[r]`` and
    ``exp(scores[r, j] - top[r]) >= min_p[r]``. ``lower`` folds top-k, top-p and a slightly
    loose score bound for min-p (so that it can pre-select); the exact min-p test is the one
    on the weights, as transformers compares probabilities.
    """

    def __init__(self, scores: np.ndarray, top: np.ndarray, lower: np.ndarray,
                 min_p: np.ndarray) -> None:
        self.scores = scores  # [n, vocab] scaled logits
        self.top = top  # [n] row maxima
        self.lower = lower  # [n] float32; -inf: nothing truncated by score
        self.min_p = min_p  # [n] float32; 0: off


def _truncate(scores: np.ndarray, params: Sequence[GenerationParams],
              skip_top_p: np.ndarray | None = None) -> _Truncation:
    """Temperature, then the kept set of top-k, top-p and min-p, for sampled rows.

    Args:
        scores: [n, vocab] float32 penalised logits of sampled rows; divided in place.
        params: the n rows' parameters.
        skip_top_p: optional [n] bool: rows whose top-p the caller applies itself.
    """
    n = scores.shape[0]
    temperature = np.fromiter((p.temperature for p in params), dtype=np.float32, count=n)
    top_k = np.fromiter((p.top_k for p in params), dtype=np.int64, count=n)
    top_p = np.fromiter((p.top_p for p in params), dtype=np.float64, count=n)
    if skip_top_p is not None:
        top_p[skip_top_p] = 1.0
    min_p = np.fromiter((p.min_p for p in params), dtype=np.float32, count=n)

    scores /= temperature[:, None]  # [n, vocab] scaled logits
    top = scores.max(axis=1)  # [n]
    _check_finite(top)
    lower = _truncation_thresholds(scores, top, top_k, top_p)  # [n]
    use_min_p = min_p > 0
    if use_min_p.any():
        # exp(s - top) >= min_p needs s >= top + log(min_p); the slack covers float32
        # rounding of s - top and of exp, so the bound never drops a kept token.
        at = np.flatnonzero(use_min_p)
        loose = top[at] + np.log(min_p[at]) - (1e-3 + 1e-6 * np.abs(top[at]))
        lower[at] = np.maximum(lower[at], loose.astype(np.float32))
    return _Truncation(scores, top, lower, min_p)


def _plain(sampler: RowSampler, vocab: int) -> bool:
    """Temperature and at most top-p: no processor, top-k or min-p (``_draw_plain``)."""
    p = sampler.params
    return not sampler.processes and not 0 < p.top_k < vocab and p.min_p == 0.0


def _check_finite(top: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(top))  # NaN anywhere, +inf, or nothing above -inf
    if bad.size:
        raise ValueError(f"sampled row {int(bad[0])} of {top.size}: no token has a positive "
                         "probability (NaN or infinite logits?)")


def _draw(scores: np.ndarray, samplers: Sequence[RowSampler]) -> np.ndarray:
    """One token per sampled row, by inverse CDF in token-id order.

    Rows whose kept set is small (top-k, a peaked top-p or min-p: the usual case) are drawn
    from their kept tokens only; the others (temperature alone, flat nuclei) from dense
    [rows, vocab] weights. Which way a row goes depends on that row alone, so a row gets the
    same token in any batch.

    Rows whose only truncation is top-p ("nucleus rows", the OpenAI-style temperature +
    top_p) never look for the nucleus' edge, which costs a sort on a flat row: a token is
    drawn from the temperature distribution and kept if it lies in the nucleus, else drawn
    again (rejection sampling, so the result follows the nucleus distribution exactly; a
    draw is kept with probability >= top_p). Testing one token is one pass: it is in the
    nucleus iff the mass of the tokens not above it exceeds (1 - top_p) of the total (see
    ``_in_nucleus``). Rows still rejected after ``_TOP_P_TRIES`` draws fall back to the
    exact edge, which keeps the result exact.

    Args:
        scores: [n, vocab] float32 penalised logits of sampled rows; overwritten.
        samplers: the n rows' samplers (their generators give the uniforms).

    Returns:
        [n] int64 token ids.
    """
    params = [s.params for s in samplers]
    n, vocab = scores.shape
    u = np.fromiter((s.draw() for s in samplers), dtype=np.float64, count=n)
    nucleus = np.fromiter((p.top_p < 1.0 and not 0 < p.top_k < vocab and p.min_p == 0.0
                           for p in params), dtype=bool, count=n)
    cut = _truncate(scores, params, skip_top_p=nucleus)
    picked = np.empty(n, dtype=np.int64)
    dense = ~np.isfinite(cut.lower)  # [n] nothing truncated: every token can come
    trunc = np.flatnonzero(~dense)
    if trunc.size:
        sub = _rows(scores, trunc)  # [t, vocab]
        keep = _SCRATCH.get("keep", sub.shape, np.bool_)
        np.greater_equal(sub, cut.lower[trunc, None], out=keep)
        small = keep.sum(axis=1) <= _SPARSE_MAX  # [t]
        if small.all():
            picked[trunc] = _sparse_pick(sub, keep, cut.top[trunc], cut.min_p[trunc], u[trunc])
        else:
            at = np.flatnonzero(small)
            if at.size:
                picked[trunc[at]] = _sparse_pick(sub[at], keep[at], cut.top[trunc[at]],
                                                 cut.min_p[trunc[at]], u[trunc[at]])
            dense[trunc[~small]] = True
    rows = np.flatnonzero(dense)
    if rows.size == 0:
        return picked
    weights = _dense_weights(cut, rows)
    picked[rows] = _nucleus_draws(weights, u[rows], [samplers[i] for i in rows],
                                  nucleus[rows], cut.scores, rows)
    return picked


def _draw_plain(logits: np.ndarray, samplers: Sequence[RowSampler]) -> np.ndarray:
    """``_draw`` for rows with temperature and at most top-p (the OpenAI-style default):
    the same numbers from one [n, vocab] buffer, so that less memory is streamed.

    Args:
        logits: [n, vocab] float32 logits (not written).
        samplers: the n rows' samplers; none has a processor, top-k or min-p.
    """
    n, vocab = logits.shape
    temperature = np.fromiter((s.params.temperature for s in samplers), np.float32, n)
    weights = _SCRATCH.get("weights", (n, vocab), np.float32)
    np.divide(logits, temperature[:, None], out=weights)  # the scaled logits, as _truncate
    top = weights.max(axis=1)
    _check_finite(top)
    weights -= top[:, None]
    np.exp(weights, out=weights)  # the same float32 numbers as _dense_weights
    u = np.fromiter((s.draw() for s in samplers), dtype=np.float64, count=n)
    nucleus = np.fromiter((s.params.top_p < 1.0 for s in samplers), bool, n)

    def scaled(rows: np.ndarray) -> np.ndarray:
        return logits[rows] / temperature[rows, None]

    return _nucleus_draws(weights, u, samplers, nucleus, scaled, np.arange(n))


def _nucleus_draws(weights: np.ndarray, u: np.ndarray, samplers: Sequence[RowSampler],
                   nucleus: np.ndarray, scores, rows: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws from dense weights; top-p for the ``nucleus`` rows by rejection.

    Args:
        weights: [r, vocab] exp(scaled - top) (0 where top-k/min-p removed a token).
        u: [r] first uniforms; samplers: [r] for the redraws.
        nucleus: [r] rows whose top-p is applied here.
        scores: the scaled logits, for the rare exact fallback: an [n, vocab] array that
            ``rows`` index, or a callable giving them for some of ``rows``.
        rows: [r] the rows' indices into ``scores``.
    """
    picked, total = _inverse_cdf(weights, u)
    local = np.flatnonzero(nucleus)  # nucleus rows, as indices into `weights`
    if local.size == 0:
        return picked
    top_p = np.fromiter((samplers[i].params.top_p for i in local), np.float64, local.size)
    for attempt in range(1, _TOP_P_TRIES + 1):
        inside = _in_nucleus(weights, local, picked[local], top_p, total[local])
        local, top_p = local[~inside], top_p[~inside]
        if local.size == 0:
            return picked
        if attempt == _TOP_P_TRIES:
            break
        again = np.fromiter((samplers[i].draw() for i in local), np.float64, local.size)
        picked[local], _ = _inverse_cdf(weights[local], again)
    # Rarely reached (top_p well below 1, or bad luck): the exact edge, one more uniform.
    flat = weights[local]  # a copy: the thresholds below reuse the "weights" buffer
    sub = scores(rows[local]) if callable(scores) else scores[rows[local]]
    lower = _truncation_thresholds(sub, sub.max(axis=1), np.zeros(local.size, np.int64), top_p)
    flat *= sub >= lower[:, None]
    again = np.fromiter((samplers[i].draw() for i in local), np.float64, local.size)
    picked[local], _ = _inverse_cdf(flat, again)
    return picked


def _in_nucleus(weights: np.ndarray, local: np.ndarray, token: np.ndarray, top_p: np.ndarray,
                total: np.ndarray) -> np.ndarray:
    """Whether each drawn token is in its row's top-p nucleus.

    transformers sorts ascending and drops the tokens whose cumulative probability is
    <= 1 - top_p; a token of weight w is thereby kept iff the mass of all tokens of weight
    <= w exceeds that budget (ties with the nucleus' last token are kept, as in
    ``_cut_in_candidates``; weights order tokens as their scaled logits do, up to float32
    rounding of exp).

    Args:
        weights: [r, vocab] exp(scaled - top).
        local: [m] the rows to test; token: [m] their drawn ids; top_p: [m];
        total: [m] float64 the rows' total weight.

    Returns:
        [m] bool.
    """
    w = _rows(weights, local)
    at = w[np.arange(local.size), token]  # [m]
    below = _SCRATCH.get("keep", w.shape, np.bool_)
    np.less_equal(w, at[:, None], out=below)
    # One fused multiply-add pass (einsum), where multiply + sum take two and a scratch row.
    mass = np.einsum("ij,ij->i", w, below)  # [m] float32
    return mass > total - top_p * total


def _dense_weights(cut: _Truncation, rows: np.ndarray) -> np.ndarray:
    """[len(rows), vocab] float32 weights exp(s - top) on kept tokens, 0 elsewhere.

    The result is the "weights" scratch buffer.
    """
    sub = _rows(cut.scores, rows)
    weights = _SCRATCH.get("weights", sub.shape, np.float32)
    np.subtract(sub, cut.top[rows, None], out=weights)
    np.exp(weights, out=weights)  # [r, vocab]; 1 at each row's argmax
    lower, min_p = cut.lower[rows], cut.min_p[rows]
    if np.isfinite(lower).any():
        keep = _SCRATCH.get("keep", sub.shape, np.bool_)
        np.greater_equal(sub, lower[:, None], out=keep)
        weights *= keep
    if (min_p > 0).any():
        # min-p keeps p >= min_p * p_max; with weights = p / p_max that is weights >= min_p.
        keep = _SCRATCH.get("keep", sub.shape, np.bool_)
        np.greater_equal(weights, min_p[:, None], out=keep)
        weights *= keep
    return weights


def _sparse_pick(sub: np.ndarray, keep: np.ndarray, top: np.ndarray, min_p: np.ndarray,
                 u: np.ndarray) -> np.ndarray:
    """Inverse CDF over each row's pre-selected tokens, all rows at once.

    Args:
        sub: [r, vocab] scaled logits; keep: [r, vocab] the pre-selection (s >= lower).
        top: [r] row maxima; min_p: [r] min-p (0 = off); u: [r] uniforms.

    Returns:
        [r] int64 token ids: the first id whose cumulative weight exceeds u * total.
    """
    r, vocab = sub.shape
    flat = np.flatnonzero(keep)  # row-major, so each row's kept ids come ascending
    row = flat // vocab
    w = np.exp(sub.ravel()[flat] - top[row])  # the same float32 exp as the dense weights
    if (min_p > 0).any():
        w *= w >= min_p[row]
    cum = np.cumsum(w, dtype=np.float64)  # across rows; each row's span is contiguous
    ends = np.cumsum(np.bincount(row, minlength=r))  # [r]; each row keeps >= 1 (its top)
    starts = np.concatenate(([0], ends[:-1]))
    before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
    target = before + u * (cum[ends - 1] - before)
    i = np.minimum(np.searchsorted(cum, target, side="right"), ends - 1)
    # u * total rounded onto a row's end, where min-p left zeros: its last positive token.
    for j in np.flatnonzero(w[i] <= 0):
        i[j] = starts[j] + np.flatnonzero(w[starts[j]:ends[j]] > 0)[-1]
    return flat[i] - row[i] * vocab


def _truncation_thresholds(scores: np.ndarray, top: np.ndarray, top_k: np.ndarray,
                           top_p: np.ndarray) -> np.ndarray:
    """Per row, the smallest scaled logit that top-k and then top-p keep (-inf: keep all).

    Args:
        scores: [n, vocab] scaled logits.
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
    sub = _rows(scores, todo)
    weights = _SCRATCH.get("weights", sub.shape, np.float32)  # [todo, vocab]
    np.subtract(sub, top[todo, None], out=weights)
    np.exp(weights, out=weights)
    both = np.flatnonzero(use_k[todo])
    if both.size:
        weights[both] *= sub[both] >= kth[todo[both], None]
    mass = weights.sum(axis=1).astype(np.float64)
    target = top_p[todo] * mass  # [todo] the nucleus holds at least this much
    while True:
        cut, found, inside = _cut_in_candidates(cand, top[todo], kth[todo], target, mass)
        # Settled if the cut falls inside the candidates, or they are the whole vocabulary,
        # or top-k is on (size >= k: all that can lie below the candidates are ties with
        # the k-th, which stay).
        done = found | (size == vocab) | use_k[todo]
        threshold[todo[done]] = np.maximum(kth[todo[done]], cut[done])
        left = ~done
        if not left.any():
            return threshold
        todo, target, mass = todo[left], target[left], mass[left]
        # A flatter row: more candidates. _TOP_P_WIDE only where the first ones came close
        # (a nucleus of hundreds); a flat row, whose nucleus is a good part of the
        # vocabulary, goes straight to a full sort rather than paying for both.
        close = inside[left] >= _WIDE_IF_HELD * target
        size = _TOP_P_WIDE if size < _TOP_P_WIDE and close.any() else vocab
        size = min(size, vocab)
        cand = _largest(scores, todo, size)


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
    w = _SCRATCH.get("cand_weights", cand.shape, np.float32)  # [r, size]
    np.subtract(cand, top[:, None], out=w)
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
    first, hit, _ = _first_cumulative(w, np.maximum(budget, 0.0), strict=True)
    first = np.where(hit, first, cand.shape[1] - 1)
    cut = np.minimum(cand[np.arange(cand.shape[0]), first], top)  # keep the top token
    return cut, found, inside


def _rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``a[rows]`` for sorted distinct ``rows``; ``a`` itself (no copy) when that is every row."""
    return a if rows.size == a.shape[0] else a[rows]


def _largest(scores: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """[len(rows), size]: the ``size`` largest values of each of ``rows``, ascending.

    For ``size`` >= vocab the result is the "sort" scratch buffer, else a new array.
    """
    vocab = scores.shape[1]
    sub = _SCRATCH.get("sort", (rows.size, vocab), np.float32)
    np.take(scores, rows, axis=0, out=sub, mode="clip")  # sorted in place below
    if size >= vocab:
        sub.sort(axis=1)
        return sub
    # O(vocab) selection; only the `size` selected values are sorted. Ascending (not
    # reversed) keeps the result contiguous for the block sums.
    sub.partition(vocab - size, axis=1)
    return np.sort(sub[:, vocab - size:], axis=1)


def _inverse_cdf(weights: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first token id whose cumulative weight exceeds u * total.

    Args:
        weights: [n, vocab] non-negative, each row with a positive entry.
        u: [n] uniforms in [0, 1).

    Returns:
        ([n] int64 token ids, each with positive weight; [n] float64 row totals).
    """
    picked, found, total = _first_cumulative(weights, u, strict=True, of_total=True)
    # u * total rounded up to (or past) the summed blocks: the last kept token. Rare.
    for r in np.flatnonzero(~found):
        picked[r] = np.flatnonzero(weights[r] > 0)[-1]
    return picked, total


def sample_rows(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """[n, vocab] non-negative weights and [n] uniforms -> [n] ids by inverse CDF in
    token-id order (what every draw here uses; the acceptance rule's residual draws too)."""
    return _inverse_cdf(weights, u)[0]


def _first_cumulative(w: np.ndarray, target: np.ndarray, strict: bool,
                      of_total: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the first index whose inclusive cumulative weight passes the target.

    Blocked so that no full-width cumsum is needed (a cumsum over 50k entries costs several
    times a sum): block sums locate the block, then one cumsum of that block the index.

    Args:
        w: [n, size] non-negative weights, C-contiguous rows.
        target: [n] float64 targets (>= 0), or fractions of the row's sum if ``of_total``.
        strict: pass means ``>`` (inverse CDF) rather than ``>=``.
        of_total: ``target`` holds fractions of each row's total weight.

    Returns:
        ([n] int64 indices, [n] bool found, [n] float64 row sums). Not found: the row's
        whole sum does not pass its target, and the index is meaningless. A found index
        has positive weight unless the target is 0 and not strict.
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
    chunk = w[rows[:, None], np.minimum(cols, size - 1)] * inside  # [n, block]
    c = np.cumsum(chunk, axis=1, dtype=np.float64)
    j = short(c, left[:, None]).sum(axis=1)  # [n]
    # The block passes but its own cumsum rounds just short: its last positive entry.
    for r in np.flatnonzero(found & (j >= block)):
        positive = np.flatnonzero(chunk[r] > 0)
        j[r] = positive[-1] if positive.size else 0
    return b * block + j, found, cum[:, -1]
