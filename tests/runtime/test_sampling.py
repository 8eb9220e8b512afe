"""Batched sampling against transformers' own logits processors, and the sampler's contract.

The reference is the processor list transformers' ``generate`` builds
(``_get_logits_processor`` on a tiny GPT-2), run on the same logits; frequency/presence
penalties, which transformers lacks, are the OpenAI formula inserted right after the
repetition penalty, where gpt2onnx applies them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.params import MAX_LOGPROBS, GenerationParams
from gpt2onnx.runtime.sampling import RowSampler, pick_tokens, processed_logprobs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS = 7


# --------------------------------------------------------------------------- reference


@functools.lru_cache(maxsize=4)
def _hf_model(vocab: int):
    config = transformers.GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=16,
                                     vocab_size=vocab, bos_token_id=EOS, eos_token_id=EOS)
    return transformers.GPT2LMHeadModel(config).eval()


class _OpenAIPenalty(transformers.LogitsProcessor):
    """logit[j] -= count_j * frequency + (count_j > 0) * presence, over generated ids."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def hf_processors(params: GenerationParams, prompt_len: int, vocab: int,
                  eos: int | None = EOS) -> list:
    """The list transformers' generate would run for ``params``, plus our OpenAI penalty."""
    sample = params.temperature > 0
    warpers = dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                   min_p=params.min_p or None) if sample else dict(top_k=None)
    config = transformers.GenerationConfig(
        do_sample=sample, repetition_penalty=params.repetition_penalty,
        min_new_tokens=params.min_tokens, eos_token_id=eos, pad_token_id=eos, **warpers)
    model = _hf_model(vocab)
    model._prepare_special_tokens(config, False, device="cpu")
    procs = list(model._get_logits_processor(config, input_ids_seq_length=prompt_len,
                                             device="cpu", model_kwargs={}))
    if params.frequency_penalty or params.presence_penalty:
        at = 1 if procs and isinstance(procs[0],
                                       transformers.RepetitionPenaltyLogitsProcessor) else 0
        procs.insert(at, _OpenAIPenalty(prompt_len, params.frequency_penalty,
                                        params.presence_penalty))
    return procs


def hf_probs(logits: np.ndarray, params: GenerationParams, prompt: list[int],
             generated: list[int], eos: int | None = EOS) -> np.ndarray:
    """[vocab] float64: softmax of transformers' processed scores (what it samples from)."""
    procs = hf_processors(params, len(prompt), logits.shape[-1], eos)
    ids = torch.tensor([prompt + generated], dtype=torch.long)
    scores = torch.from_numpy(logits[None].astype(np.float32).copy())
    for proc in procs:
        scores = proc(ids, scores)
    return torch.softmax(scores, dim=-1)[0].double().numpy()


def cdf_pick(probs: np.ndarray, u: float) -> int:
    """Inverse CDF in token-id order: the first id whose cumulative probability > u * total."""
    cum = np.cumsum(probs, dtype=np.float64)
    return int(np.searchsorted(cum, u * cum[-1], side="right"))


class FixedDraw(RowSampler):
    """A sampler whose uniforms are given, to compare picks draw by draw."""

    def __init__(self, *args, draws: list[float]) -> None:
        super().__init__(*args)
        self.draws = list(draws)

    def draw(self) -> float:
        return self.draws.pop(0)


def make_case(vocab: int, scale: float, seed: int) -> tuple[np.ndarray, list[int], list[int]]:
    """Random logits plus a prompt and generated ids that make every processor matter."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(vocab) * scale).astype(np.float32)
    order = np.argsort(-logits)
    logits[EOS] = logits[order[0]] + 1.0  # EOS on top: min_tokens visibly changes things
    prompt = [int(t) for t in order[:6]] + [int(t) for t in rng.integers(0, vocab, 20)]
    generated = [int(order[1]), int(order[1]), int(order[3]), int(order[30])]
    if seed % 2 == 0:  # penalties that boost seen ids move the argmax only if EOS is unseen
        prompt.append(EOS)
        generated.append(EOS)
    return logits, prompt, generated


def sampler_for(params: GenerationParams, prompt: list[int], generated: list[int],
                eos: int | None = EOS, cls: type[RowSampler] = RowSampler, **kw) -> RowSampler:
    sampler = cls(params, prompt, eos, **kw)
    for t in generated:
        sampler.observe(t)
    return sampler


# ------------------------------------------------------------------- against transformers

COMBOS = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=40),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=1.3, top_p=0.5),
    dict(temperature=1.0, top_p=0.995),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.8, repetition_penalty=1.3),
    dict(temperature=0.8, repetition_penalty=0.7),
    dict(temperature=1.0, min_tokens=8),
    dict(temperature=0.9, top_p=0.9, repetition_penalty=1.2),  # top-p by rejection, penalised
    dict(temperature=0.9, top_k=50, top_p=0.8),
    dict(temperature=1.2, top_k=3000, top_p=0.9),
    dict(temperature=0.7, top_k=200, top_p=0.95, min_p=0.02, repetition_penalty=1.2),
    dict(temperature=0.6, top_k=100, top_p=0.9, min_p=0.01, repetition_penalty=1.3,
         frequency_penalty=0.5, presence_penalty=0.3, min_tokens=8),
]


def _combo_id(combo: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in combo.items())


@pytest.mark.parametrize("vocab", [1000, 50257])
@pytest.mark.parametrize("scale", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
def test_distribution_and_picks_match_transformers(combo, scale, vocab):
    logits, prompt, generated = make_case(vocab, scale, seed=hash((scale, vocab)) % 1000)
    params = GenerationParams(seed=0, **combo)
    ref = hf_probs(logits, params, prompt, generated)
    ours = np.exp(processed_logprobs(logits[None], [sampler_for(params, prompt, generated)])[0])

    kept = np.flatnonzero(ours > 0)
    np.testing.assert_array_equal(kept, np.flatnonzero(ref > 0))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)

    # Fixed uniforms: our pick is the inverse CDF (ids ascending) of transformers'
    # distribution; for a row truncated by top-p alone, of its distribution without top-p,
    # redrawn while the token falls outside the nucleus (rejection sampling, see _draw).
    nucleus = params.top_p < 1 and not 0 < params.top_k < vocab and params.min_p == 0
    proposal = hf_probs(logits, dataclasses.replace(params, top_p=1.0), prompt,
                        generated) if nucleus else ref
    draws = [0.0, 1.0 - 2.0 ** -40, *np.random.default_rng(1).random(60).tolist()]
    sampler = sampler_for(params, prompt, generated, cls=FixedDraw, draws=draws + [0.5] * 8)
    cum = np.cumsum(proposal)
    exact = picks = 0
    while len(sampler.draws) > 8:
        before = list(sampler.draws)
        token = int(pick_tokens(logits[None], [sampler])[0])
        used = before[:len(before) - len(sampler.draws)]
        assert ref[token] > 0, f"picked {token}, which transformers removed (u={used})"
        expected = _rejection_pick(ref, proposal, used)
        if len(used) <= 4:  # the draw that was kept: within rounding of its CDF step
            lo, hi = cum[token] - proposal[token], cum[token]
            assert lo - 1e-6 <= used[-1] * cum[-1] <= hi + 1e-6, (token, used, lo, hi)
        exact += token == expected
        picks += 1
    assert exact >= picks - 2


def _rejection_pick(ref: np.ndarray, proposal: np.ndarray, used: list[float]) -> int:
    """What the draws ``used`` give: proposals until one is kept, after four the exact CDF."""
    for u in used[:4]:
        token = cdf_pick(proposal, u)
        if ref[token] > 0:
            return token
    return cdf_pick(ref, used[-1])


def test_flat_and_wide_nuclei_are_exercised():
    """The parametrised cases reach the paths beyond the first top-p candidate set."""
    logits, prompt, generated = make_case(50257, 1.0, seed=hash((1.0, 50257)) % 1000)
    for combo, low in ((dict(temperature=1.0, top_p=0.9), 20000),
                       (dict(temperature=1.3, top_p=0.5), 5000)):
        params = GenerationParams(**combo)
        lp = processed_logprobs(logits[None], [sampler_for(params, prompt, generated)])[0]
        assert np.isfinite(lp).sum() > low


def test_processor_order_is_transformers_generate_order():
    params = GenerationParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1,
                              repetition_penalty=1.3, min_tokens=2)
    names = [type(p).__name__ for p in hf_processors(params, 4, 100)]
    assert names == ["RepetitionPenaltyLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
                     "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
                     "MinPLogitsWarper"]


@pytest.mark.parametrize("combo", [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.5),
    dict(min_tokens=8),
    dict(frequency_penalty=1.5, presence_penalty=1.0),
    dict(repetition_penalty=1.2, frequency_penalty=-0.5, min_tokens=8),
], ids=_combo_id)
@pytest.mark.parametrize("vocab", [1000, 50257])
def test_greedy_with_processors_is_argmax_of_transformers_scores(combo, vocab):
    moved = 0
    for seed in range(8):
        logits, prompt, generated = make_case(vocab, 3.0, seed)
        params = GenerationParams(**combo)
        ref = hf_probs(logits, params, prompt, generated)
        sampler = sampler_for(params, prompt, generated)
        assert not sampler.plain_greedy
        token = int(pick_tokens(logits[None], [sampler])[0])
        assert token == int(np.argmax(ref))
        moved += token != int(np.argmax(logits))
        lp = processed_logprobs(logits[None], [sampler])[0]
        np.testing.assert_allclose(np.exp(lp), ref, rtol=1e-4, atol=1e-7)
    assert moved >= 2, "the processors hardly ever moved the argmax: a weak test"


# ---------------------------------------------------------------- frequency / presence


@pytest.mark.parametrize(("frequency", "presence"), [(0.7, 0.0), (0.0, 1.1), (-1.5, 2.0)])
def test_frequency_presence_follow_the_openai_formula(frequency, presence):
    rng = np.random.default_rng(3)
    vocab = 1000
    logits = rng.standard_normal(vocab).astype(np.float32) * 2
    prompt = [1, 2, 3, 4, 4]
    generated = [10, 10, 10, 11, 3, 12, 12]
    params = GenerationParams(frequency_penalty=frequency, presence_penalty=presence)
    counts = np.bincount(generated, minlength=vocab)  # generated only, not the prompt
    expected = logits - counts * np.float32(frequency) - (counts > 0) * np.float32(presence)
    sampler = sampler_for(params, prompt, generated)
    lp = processed_logprobs(logits[None], [sampler])[0]  # greedy: log_softmax of the scores
    shifted = expected - expected.max()
    np.testing.assert_allclose(lp, shifted - np.log(np.exp(shifted).sum()), atol=1e-5)
    # Prompt-only tokens (1, 2, 4) keep their logit relative to untouched ones (0).
    assert lp[1] - lp[0] == pytest.approx(logits[1] - logits[0], abs=1e-5)


def test_frequency_penalty_changes_the_greedy_pick():
    logits = np.zeros((1, 50), dtype=np.float32)
    logits[0, 5], logits[0, 6] = 3.0, 2.0
    sampler = sampler_for(GenerationParams(frequency_penalty=0.6), [], [5])
    assert pick_tokens(logits, [sampler])[0] == 5  # 3 - 0.6 > 2
    sampler.observe(5)
    assert pick_tokens(logits, [sampler])[0] == 6  # 3 - 1.2 < 2


# --------------------------------------------------------------------- batching, seeds


ROW_PARAMS = [
    GenerationParams(),
    GenerationParams(repetition_penalty=1.4, min_tokens=3),
    GenerationParams(temperature=0.9, seed=1),
    GenerationParams(temperature=1.0, top_k=20, seed=2),
    GenerationParams(temperature=0.8, top_p=0.9, seed=3),
    GenerationParams(temperature=1.2, top_p=0.97, seed=4),
    GenerationParams(temperature=0.7, top_k=300, top_p=0.95, min_p=0.05,
                     repetition_penalty=1.2, frequency_penalty=0.4, seed=5),
    GenerationParams(temperature=1.1, min_p=0.1, presence_penalty=0.8, min_tokens=2, seed=6),
]


def _run(params: list[GenerationParams], steps: int, vocab: int, scale: float,
         rows_of: list[int]) -> list[list[int]]:
    """Generate ``steps`` tokens per row on fixed per-step random logits."""
    rng = np.random.default_rng(11)
    all_logits = (rng.standard_normal((steps, len(ROW_PARAMS), vocab)) * scale).astype(
        np.float32)
    samplers = [RowSampler(p, [1, 2, 3], EOS) for p in params]
    out: list[list[int]] = [[] for _ in params]
    for step in range(steps):
        chosen = pick_tokens(all_logits[step, rows_of], samplers)
        for i, t in enumerate(chosen.tolist()):
            samplers[i].observe(t)
            out[i].append(t)
    return out


@pytest.mark.parametrize(("vocab", "scale"), [(1000, 3.0), (50257, 1.0), (50257, 4.0)])
def test_batch_gives_each_row_what_it_gets_alone(vocab, scale):
    together = _run(ROW_PARAMS, 6, vocab, scale, list(range(len(ROW_PARAMS))))
    for i, p in enumerate(ROW_PARAMS):
        assert _run([p], 6, vocab, scale, [i])[0] == together[i], f"row {i}: {p}"
    # And the rows are not all alike (the batch really mixes kinds).
    assert len({tuple(t) for t in together}) == len(ROW_PARAMS)


@pytest.mark.parametrize("u", [0.0, 0.5, 1.0 - 2.0 ** -40])
def test_batch_edges_of_the_cdf_stay_in_their_row(u):
    """u = 0 and u -> 1 land on a row's first and last kept token, never a neighbour's."""
    rng = np.random.default_rng(8)
    logits = (rng.standard_normal((6, 50257)) * 3).astype(np.float32)
    params = [GenerationParams(temperature=1.0, top_k=5), GenerationParams(temperature=1.0),
              GenerationParams(temperature=0.8, top_p=0.5),
              GenerationParams(temperature=1.0, min_p=0.2),
              GenerationParams(temperature=1.0, top_k=40, top_p=0.9, min_p=0.05),
              GenerationParams(temperature=1.0, top_k=3)]
    # Five equal uniforms: a top-p-only row (index 2) may reject and redraw, see _draw.
    together = pick_tokens(logits, [FixedDraw(p, [], EOS, draws=[u] * 5) for p in params])
    for i, p in enumerate(params):
        alone = pick_tokens(logits[i:i + 1], [FixedDraw(p, [], EOS, draws=[u] * 5)])
        assert together[i] == alone[0], f"row {i}: {p}"
        probs = np.exp(processed_logprobs(logits[i:i + 1], [RowSampler(p, [], EOS)])[0])
        proposal = probs
        if i == 2:
            proposal = np.exp(processed_logprobs(logits[i:i + 1], [RowSampler(
                dataclasses.replace(p, top_p=1.0), [], EOS)])[0])
        assert together[i] == _rejection_pick(probs, proposal, [u] * 5)


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = np.random.default_rng(0).standard_normal((1, 50257)).astype(np.float32)

    def tokens(seed: int | None) -> list[int]:
        sampler = RowSampler(GenerationParams(temperature=1.0, top_p=0.9, seed=seed), [], EOS)
        return [int(pick_tokens(logits, [sampler])[0]) for _ in range(20)]

    assert tokens(5) == tokens(5)
    assert tokens(5) != tokens(6)
    assert tokens(None) != tokens(None)


def test_draws_follow_the_distribution():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4, 1e-9]], dtype=np.float32))
    sampler = RowSampler(GenerationParams(temperature=1.0, top_p=0.95, seed=0), [], None)
    picks = [int(pick_tokens(logits, [sampler])[0]) for _ in range(20000)]
    freq = np.bincount(picks, minlength=5) / len(picks)
    # top_p 0.95 drops 0.1 (mass above it 0.9 < 0.95 keeps it; 1e-9 goes).
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4, 0.0], atol=0.015)


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_rejected_nucleus_draws_keep_the_distribution(top_p):
    """Top-p alone is drawn by rejection (and, after four rejections, from the exact
    nucleus); either way the frequencies are transformers' distribution. At top_p 0.3
    about a third of the picks reach the exact fallback."""
    logits = (np.random.default_rng(3).standard_normal((1, 40)) * 1.5).astype(np.float32)
    params = GenerationParams(temperature=1.0, top_p=top_p, seed=0)
    ref = hf_probs(logits[0], params, [], [])
    sampler = RowSampler(params, [], None)
    picks = [int(pick_tokens(logits, [sampler])[0]) for _ in range(15000)]
    freq = np.bincount(picks, minlength=40) / len(picks)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(ref > 0))
    np.testing.assert_allclose(freq, ref, atol=0.015)


def test_u_next_to_one_picks_the_last_kept_token():
    logits = np.random.default_rng(2).standard_normal((1, 50257)).astype(np.float32) * 3
    params = GenerationParams(temperature=1.0, top_k=10)
    sampler = FixedDraw(params, [], EOS, draws=[np.nextafter(1.0, 0.0)])
    token = int(pick_tokens(logits, [sampler])[0])
    assert token == int(np.sort(np.argsort(-logits[0])[:10])[-1])


# ----------------------------------------------------------- greedy ids, plain greedy


def test_greedy_ids_serve_plain_greedy_rows_only():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((4, 1000)).astype(np.float32)
    samplers = [RowSampler(GenerationParams(), [], EOS),
                RowSampler(GenerationParams(repetition_penalty=1.3), [], EOS),
                RowSampler(GenerationParams(temperature=1.0, top_k=1), [], EOS),
                RowSampler(GenerationParams(), [], EOS)]
    fake = np.array([11, 22, 33, 44], dtype=np.int64)  # not the argmax: shows which is used
    chosen = pick_tokens(logits, samplers, greedy_ids=fake)
    argmax = logits.argmax(axis=1)
    assert chosen.dtype == np.int64
    assert chosen.tolist() == [11, argmax[1], argmax[2], 44]
    assert pick_tokens(logits, samplers).tolist() == argmax.tolist()


def test_plain_greedy_property():
    def plain(**kw) -> bool:
        return RowSampler(GenerationParams(**kw), [1, 2], EOS).plain_greedy

    assert plain()
    assert plain(top_k=5, top_p=0.5, min_p=0.2)  # warpers cannot move the argmax
    assert not plain(temperature=0.5)
    assert not plain(repetition_penalty=1.1)
    assert not plain(frequency_penalty=0.1)
    assert not plain(presence_penalty=-0.1)
    assert not plain(min_tokens=1)
    assert RowSampler(GenerationParams(min_tokens=3), [], None).plain_greedy  # no EOS
    sampler = RowSampler(GenerationParams(min_tokens=2), [], EOS)
    sampler.observe(4)
    assert not sampler.plain_greedy
    sampler.observe(5)
    assert sampler.plain_greedy  # min_tokens reached: EOS no longer blocked


def test_min_tokens_blocks_eos_until_reached():
    logits = np.zeros((1, 100), dtype=np.float32)
    logits[0, EOS], logits[0, 9] = 10.0, 5.0
    for params in (GenerationParams(min_tokens=3),
                   GenerationParams(min_tokens=3, temperature=1.0, seed=0)):
        sampler = RowSampler(params, [1, 2], EOS)
        picks = []
        for _ in range(4):
            picks.append(int(pick_tokens(logits, [sampler])[0]))
            sampler.observe(picks[-1])
        assert EOS not in picks[:3]
        assert picks[3] == EOS or params.temperature > 0
    # No EOS id: min_tokens is a no-op.
    assert pick_tokens(logits, [RowSampler(GenerationParams(min_tokens=3), [], None)])[0] == EOS


def test_repetition_penalty_counts_the_prompt():
    logits = np.zeros((1, 100), dtype=np.float32)
    logits[0, 3], logits[0, 4] = 2.0, 1.5
    assert pick_tokens(logits, [RowSampler(GenerationParams(repetition_penalty=1.5), [3],
                                           None)])[0] == 4  # 2 / 1.5 < 1.5
    assert pick_tokens(logits, [RowSampler(GenerationParams(frequency_penalty=1.0), [3],
                                           None)])[0] == 3  # the prompt does not count here


def test_top_k_keeps_ties_like_transformers():
    logits = np.arange(1000, dtype=np.float32) / 100
    logits[[100, 200, 300]] = logits[995]  # three more tokens tie with the 5th largest
    params = GenerationParams(temperature=1.0, top_k=5)
    ours = np.exp(processed_logprobs(logits[None], [RowSampler(params, [], None)])[0])
    ref = hf_probs(logits, params, [0], [], eos=None)
    np.testing.assert_array_equal(np.flatnonzero(ours), [100, 200, 300, 995, 996, 997, 998,
                                                         999])
    np.testing.assert_array_equal(np.flatnonzero(ours), np.flatnonzero(ref))


# ---------------------------------------------------------------- input left untouched


def test_logits_are_never_written():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((len(ROW_PARAMS), 50257)).astype(np.float32)
    before = logits.copy()
    logits.flags.writeable = False  # any in-place write raises
    samplers = [RowSampler(p, [1, 2, 3, int(np.argmax(logits[i]))], EOS)
                for i, p in enumerate(ROW_PARAMS)]
    for _ in range(3):
        chosen = pick_tokens(logits, samplers)
        processed_logprobs(logits, samplers)
        for s, t in zip(samplers, chosen.tolist(), strict=True):
            s.observe(t)
    np.testing.assert_array_equal(logits, before)


def test_threads_do_not_share_work_buffers():
    """Work buffers are per thread: concurrent batches give what they give alone."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((n, 50257)).astype(np.float32) for n in (1, 3, 8, 16)]

    def run(logits: np.ndarray) -> list[int]:
        samplers = [RowSampler(GenerationParams(temperature=0.9, top_p=0.9, seed=i), [], EOS)
                    for i in range(logits.shape[0])]
        return [t for _ in range(5) for t in pick_tokens(logits, samplers).tolist()]

    alone = [run(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(run, batches)) == alone


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_raise_instead_of_picking_garbage(bad):
    logits = np.zeros((2, 100), dtype=np.float32)
    if bad == -np.inf:
        logits[1] = bad  # every token impossible
    else:
        logits[1, 3] = bad  # one NaN or +inf spoils the row's softmax
    samplers = [RowSampler(GenerationParams(temperature=1.0), [], None) for _ in range(2)]
    with pytest.raises(ValueError, match="sampled row 1 of 2: no token has a positive"):
        pick_tokens(logits, samplers)


def test_bad_batch_shapes():
    sampler = RowSampler(GenerationParams(), [], None)
    with pytest.raises(ValueError, match="rows, vocab"):
        pick_tokens(np.zeros(10, dtype=np.float32), [sampler])
    with pytest.raises(ValueError, match="2 rows of logits for 1 samplers"):
        pick_tokens(np.zeros((2, 10), dtype=np.float32), [sampler])
    with pytest.raises(ValueError, match="greedy_ids has 3 entries for 1 rows"):
        pick_tokens(np.zeros((1, 10), dtype=np.float32), [sampler], np.zeros(3, np.int64))


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("kwargs", "param", "match"), [
    ({"min_p": -0.1}, "min_p", r"min_p must be in \[0, 1\], got -0.1; use 0 to disable"),
    ({"min_p": 1.5}, "min_p", r"min_p must be in \[0, 1\], got 1.5"),
    ({"min_p": "0.1"}, "min_p", "min_p must be a number, got '0.1'"),
    ({"min_p": math.nan}, "min_p", "min_p must be finite, got nan"),
    ({"frequency_penalty": 2.5}, "frequency_penalty",
     r"frequency_penalty must be in \[-2, 2\], got 2.5; use 0 to disable"),
    ({"frequency_penalty": -3}, "frequency_penalty", r"in \[-2, 2\], got -3"),
    ({"frequency_penalty": None}, "frequency_penalty", "must be a number, got None"),
    ({"presence_penalty": -2.01}, "presence_penalty",
     r"presence_penalty must be in \[-2, 2\], got -2.01"),
    ({"presence_penalty": True}, "presence_penalty", "must be a number, got True"),
    ({"presence_penalty": math.inf}, "presence_penalty", "must be finite, got inf"),
    ({"min_tokens": -1}, "min_tokens", r"min_tokens must be in \[0, 32\], got -1"),
    ({"min_tokens": 33}, "min_tokens", r"min_tokens must be in \[0, 32\], got 33.*max_new"),
    ({"min_tokens": 5, "max_new_tokens": 4}, "min_tokens", r"in \[0, 4\], got 5"),
    ({"min_tokens": 1.0}, "min_tokens", "min_tokens must be an integer, got 1.0"),
    ({"prompt_logprobs": -1}, "prompt_logprobs",
     rf"prompt_logprobs must be in \[0, {MAX_LOGPROBS}\], got -1"),
    ({"prompt_logprobs": MAX_LOGPROBS + 1}, "prompt_logprobs",
     rf"in \[0, {MAX_LOGPROBS}\], got {MAX_LOGPROBS + 1}"),
    ({"prompt_logprobs": "3"}, "prompt_logprobs", "must be an integer, got '3'"),
    ({"temperature": 1e-5}, "temperature",
     r"temperature must be 0 or >= 0.0001, got 1e-05 .*use 0 for greedy"),
    ({"temperature": 5e-324}, "temperature", "got 5e-324"),
    ({"repetition_penalty": 0.001}, "repetition_penalty",
     r"repetition_penalty must be > 0 and in \[0.01, 100\] .*got 0.001"),
    ({"repetition_penalty": 101}, "repetition_penalty", r"\[0.01, 100\].*got 101"),
    ({"repetition_penalty": -1}, "repetition_penalty", "got -1"),
])
def test_bad_new_parameters(kwargs, param, match):
    with pytest.raises(InvalidParameterError, match=match) as err:
        GenerationParams(**kwargs)
    assert err.value.param == param


@pytest.mark.parametrize("kwargs", [
    {"min_p": 0.0}, {"min_p": 1.0}, {"frequency_penalty": -2.0}, {"presence_penalty": 2.0},
    {"min_tokens": 32}, {"min_tokens": 0}, {"prompt_logprobs": 0},
    {"prompt_logprobs": MAX_LOGPROBS}, {"temperature": 1e-4}, {"repetition_penalty": 0.01},
    {"repetition_penalty": 100.0},
])
def test_boundary_values_are_accepted(kwargs):
    params = GenerationParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(params, name) == value
