"""Speculative decoding: drafts verified in one step give the output of plain decoding
(greedy: token for token; sampled: the same distribution), for every drafter and batch."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2onnx.errors import InvalidParameterError, ModelFolderError
from gpt2onnx.runtime.drafting import NgramDrafter, lookup
from gpt2onnx.runtime.model import Model
from gpt2onnx.runtime.params import GenerationParams
from gpt2onnx.runtime.speculative import DraftLength, accept_sampled
from tests.conftest import EMBEDDED_MODEL

GREEDY = GenerationParams(max_new_tokens=40, stop_on_eos=False)
# A prompt that repeats itself, so prompt lookup has something to find at once.
LOOPY = [464, 3290, 318, 257, 1049, 13, 464, 3290, 318, 257, 1049, 13, 464, 3290]


def run(model: Model, prompts, params, **spec):
    gen = model.generator(prompts, params, **spec)
    try:
        while not gen.is_done():
            gen.generate_next_token()
        return [(list(r.token_ids), r.text, r.finish_reason, list(r.logprobs)) for r in gen.rows], \
            gen.speculation
    finally:
        gen.close()


def tokens(results):
    return [r[0] for r in results]


@pytest.fixture(scope="module")
def target(tiny_fused: Path) -> Model:
    return Model(tiny_fused)


@pytest.fixture(scope="module")
def int8_draft(tiny_checkpoint: Path, export_folder) -> Path:
    return export_folder(tiny_checkpoint, layout="fused", precision="int8")


@pytest.fixture(scope="module")
def small_draft(make_checkpoint, export_folder) -> Path:
    """Another, smaller checkpoint with the same tokenizer (a 'distilgpt2' for the target)."""
    return export_folder(make_checkpoint(seed=3, n_layer=1), layout="fused")


@pytest.fixture(scope="module")
def embedded(export_folder) -> dict[str, Model]:
    if not (EMBEDDED_MODEL / "config.json").exists():
        pytest.skip("embedded model missing")
    return {p: Model(export_folder(EMBEDDED_MODEL, layout="fused", precision=p))
            for p in ("fp32", "int8")}


# ----------------------------------------------------------------------- greedy: identical


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_prompt_lookup_equals_plain(target, embedded, k):
    plain, _ = run(target, [LOOPY], GREEDY)
    spec, stats = run(target, [LOOPY], GREEDY, draft="ngram", num_draft_tokens=k)
    assert tokens(spec) == tokens(plain)
    assert stats.proposed > 0 and stats.accepted > 0, stats  # it really speculated
    # A trained model: drafts are accepted and rejected (both paths run).
    model = embedded["fp32"]
    prompt = model.encode("def read(self, path):\n    \"\"\"Return the contents of path.\n\n"
                          "    Return the")
    params = GenerationParams(max_new_tokens=64, stop_on_eos=False)
    plain, _ = run(model, [prompt], params)
    spec, stats = run(model, [prompt], params, draft="ngram", num_draft_tokens=k)
    assert tokens(spec) == tokens(plain)
    assert 0 < stats.accepted < stats.proposed, stats


@pytest.mark.parametrize("which", ["int8_draft", "small_draft"])
@pytest.mark.parametrize("k", [2, 5])
def test_greedy_draft_model_equals_plain(target, which, k, request):
    draft = Model(request.getfixturevalue(which), spinning=False)
    prompt = target.encode("The history of the city")
    plain, _ = run(target, [prompt], GREEDY)
    spec, stats = run(target, [prompt], GREEDY, draft=draft, num_draft_tokens=k)
    assert tokens(spec) == tokens(plain)
    assert stats.rounds > 0 and stats.proposed > 0


def test_draft_folder_path_works_and_its_cache_goes_back(target, int8_draft):
    plain, _ = run(target, [LOOPY], GREEDY)
    gen = target.generator([LOOPY], GREEDY, draft=str(int8_draft))
    drafter = gen.drafter
    while not gen.is_done():
        gen.generate_next_token()
    assert list(gen.rows[0].token_ids) == tokens(plain)[0]
    cache = drafter.cache
    gen.close()
    assert cache in drafter.model._idle  # the draft's cache is back in its pool


def test_mixed_batch_rows_accept_different_counts_and_end_at_different_steps(target):
    prompts = [LOOPY, target.encode("Once upon a time"), LOOPY[:7], [50, 60, 70]]
    params = [GREEDY.with_(max_new_tokens=n) for n in (40, 9, 23, 1)]
    plain, _ = run(target, prompts, params)
    for draft in ("ngram",):
        spec, stats = run(target, prompts, params, draft=draft, num_draft_tokens=4,
                          speculative_max_batch=8)
        assert tokens(spec) == tokens(plain)
        assert [r[2] for r in spec] == [r[2] for r in plain]
        assert stats.rounds > 0


def test_rows_added_later_speculate_too(target):
    gen = target.generator([LOOPY], GREEDY, batch_size=3, draft="ngram",
                           speculative_max_batch=3)
    gen.generate_next_token()
    gen.add(LOOPY[3:], GREEDY.with_(max_new_tokens=12))
    while not gen.is_done():
        gen.generate_next_token()
    got = [list(r.token_ids) for r in gen.rows if r is not None]
    gen.close()
    plain, _ = run(target, [LOOPY, LOOPY[3:]], [GREEDY, GREEDY.with_(max_new_tokens=12)])
    assert got == tokens(plain)


def test_above_max_batch_rows_decode_plainly(target):
    _, stats = run(target, [LOOPY, LOOPY[2:]], GREEDY, draft="ngram", speculative_max_batch=1)
    assert stats.rounds == 0
    _, stats = run(target, [LOOPY, LOOPY[2:]], GREEDY, draft="ngram", speculative_max_batch=2)
    assert stats.rounds > 0


def test_stop_strings_eos_and_logprobs_as_without_speculation(embedded):
    model = embedded["fp32"]
    prompt = "def get(self, key):\n    \"\"\"Return the value for key.\n\n    Return the"
    for params in (GenerationParams(max_new_tokens=60, stop=["."]),
                   GenerationParams(max_new_tokens=60, stop=[" the value", "\n\n"]),
                   GenerationParams(max_new_tokens=120),  # EOS ends it
                   GenerationParams(max_new_tokens=30, logprobs=2, stop_on_eos=False)):
        plain, _ = run(model, [prompt], params)
        spec, _ = run(model, [prompt], params, draft="ngram", num_draft_tokens=6)
        (p_ids, p_text, p_end, p_lp), = plain
        (s_ids, s_text, s_end, s_lp), = spec
        assert (s_ids, s_text, s_end) == (p_ids, p_text, p_end), params
        assert len(s_lp) == len(p_lp)
        for a, b in zip(s_lp, p_lp, strict=True):
            assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
            assert abs(a.logprob - b.logprob) < 1e-3  # k+1-token runs round differently


def test_eos_ends_a_row_inside_an_accepted_draft(embedded):
    model = embedded["fp32"]
    prompt = "Return the number of items.\n\nReturn the number of"
    params = GenerationParams(max_new_tokens=200)
    plain, _ = run(model, [prompt], params)
    spec, _ = run(model, [prompt], params, draft="ngram")
    assert plain[0][2] == "stop" and tokens(spec) == tokens(plain)


def test_int8_target_and_draft_of_the_embedded_model(embedded):
    target, draft = embedded["fp32"], embedded["int8"]
    prompts = ["def close(self):\n    \"\"\"Close the", "Return a list of"]
    params = GenerationParams(max_new_tokens=48, stop_on_eos=False)
    plain8, _ = run(draft, prompts[:1], params)
    spec8, stats = run(draft, prompts[:1], params, draft="ngram")
    assert tokens(spec8) == tokens(plain8) and stats.rounds > 0
    for prompt in prompts:
        plain, _ = run(target, [prompt], params)
        spec, stats = run(target, [prompt], params, draft=draft, num_draft_tokens=5)
        assert tokens(spec) == tokens(plain)
        assert stats.acceptance_rate > 0.5, stats  # a trained model agrees with its int8 self


@pytest.fixture(scope="module")
def quantized_targets(tiny_checkpoint: Path, export_folder, embedded) -> dict[str, tuple]:
    """int8 targets with an int4 draft of the same checkpoint, tiny and trained."""
    out = {}
    for name, checkpoint in (("tiny", tiny_checkpoint), ("embedded", EMBEDDED_MODEL)):
        out[name] = tuple(Model(export_folder(checkpoint, layout="fused", precision=p),
                                spinning=p == "int8")
                          for p in ("int8", "int4"))
    return out


@pytest.mark.parametrize("which", ["tiny", "embedded"])
@pytest.mark.parametrize("drafter", ["ngram", "int4"])
@pytest.mark.parametrize("k", [2, 5])
def test_greedy_on_an_int8_target_equals_plain(quantized_targets, which, drafter, k):
    """int8 folders scale each token row on its own, so a position verified inside a
    k+1-token run gets the logits of a one-token step (up to the attention kernel's
    float rounding): greedy speculation keeps the plain tokens, alone and in a batch."""
    target, int4 = quantized_targets[which]
    draft = "ngram" if drafter == "ngram" else int4
    texts = ["def read(self, path):\n    \"\"\"Return the", "Return the number of items in",
             "class Cache:\n    \"\"\"A cache of", "import os\n\n\ndef main():\n"]
    prompts = [target.encode(t) for t in texts] if which == "embedded" else \
        [LOOPY, LOOPY[:7], [50, 60, 70], target.encode("Once upon a time")]
    params = [GREEDY.with_(max_new_tokens=n) for n in (40, 17, 29, 5)]
    plain, _ = run(target, prompts, params)
    alone, stats = run(target, prompts[:1], params[:1], draft=draft, num_draft_tokens=k)
    assert tokens(alone) == tokens(plain)[:1] and stats.proposed > 0, stats
    batched, stats = run(target, prompts, params, draft=draft, num_draft_tokens=k,
                         speculative_max_batch=8)
    assert tokens(batched) == tokens(plain) and stats.rounds > 0


def test_context_end(target):
    capacity = target.context_length
    prompt = (LOOPY * 20)[:capacity - 6]
    params = GenerationParams(max_new_tokens=6, stop_on_eos=False)
    plain, _ = run(target, [prompt], params)
    spec, _ = run(target, [prompt], params, draft="ngram", num_draft_tokens=8)
    assert tokens(spec) == tokens(plain) and len(tokens(spec)[0]) == 6


def test_greedy_with_penalties_equals_plain(target):
    params = GREEDY.with_(repetition_penalty=1.3, min_tokens=5)
    plain, _ = run(target, [LOOPY], params)
    spec, stats = run(target, [LOOPY], params, draft="ngram")
    assert tokens(spec) == tokens(plain) and stats.proposed > 0


def test_a_row_can_opt_out(target):
    _, stats = run(target, [LOOPY], GREEDY.with_(num_draft_tokens=0), draft="ngram")
    assert stats.rounds == 0


# ----------------------------------------------------------------- sampled: same law


def _next_token_dists(model: Model) -> np.ndarray:
    """[2, 12]: two of the model's real next-token distributions (after "Return the
    number" and "Return the number of"), over the first one's 12 likeliest tokens (few
    enough that a few thousand draws estimate them)."""
    from gpt2onnx.runtime.cache import Append

    cache = model.cache(1)
    result = cache.step([Append(0, model.encode("Return the number of"), keep=2)])
    rows = result.logits(0)[-2:].astype(np.float64)  # [2, vocab]
    model._return_cache(cache)
    top = np.argsort(-rows[0])[:12]
    p = np.exp(rows[:, top] - rows[:, top].max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _first_two(p: np.ndarray, q: np.ndarray | None, draft: np.ndarray,
               rng: np.random.Generator, rule=accept_sampled) -> list[int]:
    """The first two tokens one verification of ``draft`` emits (p[1] after the first)."""
    got: list[int] = []

    def take(t: int) -> bool:
        got.append(t)
        return True

    rule(draft, q, lambda j: p[min(j, 1)], rng.random, take)
    return got[:2]


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_acceptance_rule_keeps_the_target_distribution(embedded, kind):
    p = _next_token_dists(embedded["fp32"])  # [2, 12]
    rng = np.random.default_rng(1)
    n = 6000
    if kind == "ngram":
        q = None
        draft = np.array([3, 0])  # a fixed guess, as prompt lookup makes
        drafts = [draft] * n
    else:
        q = rng.dirichlet(np.ones(12), size=2)  # a draft that disagrees with the target
        drafts = [np.array([rng.choice(12, p=q[0]), rng.choice(12, p=q[1])]) for _ in range(n)]
    firsts, seconds = [], []
    draws = np.random.default_rng(0)
    for draft in drafts:
        got = _first_two(p, q, draft, draws)
        firsts.append(got[0])
        if len(got) == 2:  # the first draft was accepted: the second token is p[1]'s
            seconds.append(got[1])
    f = np.bincount(firsts, minlength=12) / len(firsts)
    assert 0.5 * np.abs(f - p[0]).sum() < 0.03, (f, p[0])  # total variation
    s = np.bincount(seconds, minlength=12) / len(seconds)
    assert 0.5 * np.abs(s - p[1]).sum() < 0.06, (s, p[1])

    # The test has power: accepting every draft gives the draft's law, far from p.
    def always(drafts_, q_, p_at, draw, take):
        for x in drafts_.tolist():
            take(x)
        return len(drafts_)

    broken = [_first_two(p, q, d, draws, rule=always)[0] for d in drafts[:2000]]
    b = np.bincount(broken, minlength=12) / len(broken)
    assert 0.5 * np.abs(b - p[0]).sum() > 0.1


def test_sampled_speculation_is_seeded_and_ends_like_plain_rows(embedded):
    model = embedded["fp32"]
    prompt = "Return the number of items.\n\nReturn the"
    params = GenerationParams(max_new_tokens=40, temperature=0.8, top_p=0.95, seed=7,
                              stop_on_eos=False, logprobs=1)
    a, stats = run(model, [prompt], params, draft="ngram")
    b, _ = run(model, [prompt], params, draft="ngram")
    assert a == b and stats.rounds > 0
    assert len(a[0][0]) == 40 and len(a[0][3]) == 40 and a[0][2] == "length"
    draft = embedded["int8"]
    c, stats = run(model, [prompt], params.with_(seed=8), draft=draft)
    assert len(c[0][0]) == 40 and stats.proposed > 0


# ----------------------------------------------------------------------- refused drafts


def test_refused_drafts(target, tiny_checkpoint, export_folder, make_checkpoint, tmp_path,
                        tiny_standard):
    other_vocab = Model(export_folder(make_checkpoint(seed=1, vocab_size=1000), layout="fused"))
    with pytest.raises(ModelFolderError, match="vocabulary of 1000 tokens"):
        target.generator([LOOPY], GREEDY, draft=other_vocab)

    short = Model(export_folder(tiny_checkpoint, layout="fused", max_length=64))
    with pytest.raises(ModelFolderError, match="--max-length 128"):
        target.generator([LOOPY], GREEDY, draft=short)

    with pytest.raises(ModelFolderError, match="fused layout"):
        target.generator([LOOPY], GREEDY, draft=Model(tiny_standard))
    with pytest.raises(InvalidParameterError, match="fused model folder"):
        Model(tiny_standard).generator([LOOPY], GREEDY, draft="ngram")

    # Same vocabulary size, other token ids: two tokens swapped in the draft's tokenizer.
    copy = tmp_path / "swapped"
    shutil.copytree(target.folder, copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "the", "The"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelFolderError, match="different tokenizer"):
        target.generator([LOOPY], GREEDY, draft=Model(copy, verify=False))

    with pytest.raises(InvalidParameterError, match="neither 'ngram' nor a model folder"):
        target.generator([LOOPY], GREEDY, draft=str(tmp_path / "nowhere"))
    with pytest.raises(InvalidParameterError, match="got int"):
        target.generator([LOOPY], GREEDY, draft=3)


@pytest.mark.parametrize("bad", [0, 17, "4", True, 2.0])
def test_bad_num_draft_tokens(target, bad):
    with pytest.raises(InvalidParameterError,
                       match=r"num_draft_tokens must be an integer in \[1, 16\]"):
        target.generator([LOOPY], GREEDY, draft="ngram", num_draft_tokens=bad)


@pytest.mark.parametrize("bad", [-1, 17, "2"])
def test_bad_per_row_num_draft_tokens(bad):
    with pytest.raises(InvalidParameterError, match="num_draft_tokens"):
        GenerationParams(num_draft_tokens=bad)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(max_n=0), r"ngram_max must be an integer in \[1, 8\]"),
    (dict(min_n=9), r"ngram_min must be an integer in \[1, 8\]"),
    (dict(max_n=2, min_n=3), r"ngram_min \(3\) must be <= ngram_max \(2\)"),
])
def test_bad_ngram_sizes(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        NgramDrafter(**kwargs)


def test_bad_speculative_max_batch(target):
    with pytest.raises(InvalidParameterError, match="speculative_max_batch must be an integer"):
        target.generator([LOOPY], GREEDY, draft="ngram", speculative_max_batch=-1)


# --------------------------------------------------------------------------- the parts


def test_lookup_takes_the_latest_longest_match():
    ctx = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    # "2 3" last occurred before "7 8"; the 3-gram "5 2 3" never did.
    assert lookup(ctx, 3, 3, 2).tolist() == [7, 8, 5]
    assert lookup(ctx, 1, 3, 2).tolist() == [7]
    assert lookup(np.array([4, 5, 6]), 3, 3, 1).tolist() == []
    assert lookup(np.array([4, 4]), 2, 3, 1).tolist() == [4]
    assert lookup(np.array([1, 2, 1]), 4, 3, 2).tolist() == []  # min_n 2: "2 1" is new
    # A loop: the latest match is followed by one token; an earlier one by k.
    assert lookup(np.array([7, 7, 7, 7, 7, 7]), 3, 2, 1).tolist() == [7, 7, 7]


def test_draft_length_adapts_and_pauses():
    d = DraftLength(6)
    assert d.wanted() == 2  # small first: a draft that never agrees is found out cheaply
    d.update(2, 2)
    assert d.k == 4
    d.update(4, 4)
    assert d.k == 6  # capped
    d.update(6, 1)
    assert d.k == 2
    d.update(2, 2)
    assert d.k == 4
    d.update(4, 0)
    d.update(1, 0)  # two complete misses: a pause of plain steps
    assert [d.wanted() for _ in range(8)] == [0] * 8
    assert d.wanted() == 1
    d.update(1, 0)
    d.update(1, 0)
    assert [d.wanted() for _ in range(16)] == [0] * 16  # and the next pause is longer
    d.update(0, 0)  # nothing proposed: no change
    assert d.wanted() == 1
    assert DraftLength(1).wanted() == 1
    # Right now and then is still a miss: one token of four kept, twice.
    d = DraftLength(8)
    d.k = 4
    d.update(4, 1)
    d.update(2, 0)
    assert d.wanted() == 0


def test_a_round_that_costs_more_than_it_saves_is_a_miss():
    d = DraftLength(8)
    d.update(2, 2, slower=True)
    assert d.k == 4  # fully accepted: the draft length still grows
    d.update(4, 4, slower=True)  # but two rounds slower than plain steps pause the row
    assert [d.wanted() for _ in range(8)] == [0] * 8
    d.update(8, 8, slower=False)
    d.update(8, 8, slower=True)
    assert d.wanted() > 0  # one slow round after one that paid is not a pause


def _slow_drafter(gen, seconds: float) -> None:
    propose = gen.drafter.propose

    def slow(requests):
        time.sleep(seconds)
        return propose(requests)

    gen.drafter.propose = slow


@pytest.mark.parametrize("sampled", [False, True])
def test_greedy_rows_stop_drafting_when_drafting_costs_more_than_it_saves(target, int8_draft,
                                                                         sampled):
    """An accepted draft that takes longer than the plain steps it replaces (here: a
    drafter made 30 ms slower than a ~1 ms tiny-model step) pauses a greedy row like a
    rejected one; sampled rows are judged by acceptance only (their draws depend on
    speculation, so a seeded row must not depend on timing)."""
    params = GREEDY.with_(max_new_tokens=60)
    if sampled:
        params = params.with_(temperature=0.7, seed=1)
    draft = Model(int8_draft, spinning=False)  # agrees with the target most of the time
    gen = target.generator([LOOPY], params, draft=draft)
    _slow_drafter(gen, 0.03)
    rounds = []  # verifications so far, after each step
    while not gen.is_done():
        gen.generate_next_token()
        rounds.append(gen.speculation.rounds)
    got, stats = list(gen.rows[0].token_ids), gen.speculation
    gen.close()
    if sampled:
        assert stats.emitted >= 40, stats  # its drafts are accepted: it keeps drafting
        return
    # The prefill, a plain first step (to time one), two accepted but slow rounds, then a
    # pause of 8 plain steps.
    assert rounds[:12] == [0, 0, 1, 2] + [2] * 8, rounds
    assert stats.accepted > stats.proposed / 2  # paused for time, not for rejections
    assert got == tokens(run(target, [LOOPY], params)[0])[0]


# ------------------------------------------------------------------------------- the CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2onnx.runtime.generate", *args],
                          capture_output=True, text=True, timeout=180)


def test_cli_speculative_gives_the_plain_tokens(tiny_fused, int8_draft):
    text = "The cat sat on the mat. The cat sat on the"
    base = ["--prompt", text, "--max-new-tokens", "16", "--json"]
    plain = json.loads(_cli(str(tiny_fused), *base).stdout)
    for extra in (["--speculative", "ngram"], ["--draft", str(int8_draft)],
                  ["--speculative", f"draft:{int8_draft}", "--num-draft-tokens", "3"]):
        proc = _cli(str(tiny_fused), *base, *extra)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["token_ids"] == plain["token_ids"], extra
        assert out["speculation"]["rounds"] > 0, extra
    proc = _cli(str(tiny_fused), "--prompt", text, "--max-new-tokens", "16", "--stream",
                "--speculative", "ngram")
    assert proc.returncode == 0 and proc.stdout == text + plain["text"] + "\n"


@pytest.mark.parametrize(("extra", "message"), [
    (["--speculative", "bogus"], "--speculative must be 'ngram' or 'draft:FOLDER', got 'bogus'"),
    (["--speculative", "ngram", "--draft", "x"], "give --speculative or --draft, not both"),
    (["--speculative", "ngram", "--num-draft-tokens", "99"],
     "num_draft_tokens must be an integer in [1, 16], got 99"),
    (["--draft", "/nonexistent/folder"], "neither 'ngram' nor a model folder"),
])
def test_cli_bad_speculation_exits_2_in_one_line(tiny_fused, extra, message):
    proc = _cli(str(tiny_fused), "--prompt", "Hi", *extra)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_failed_draft_run_is_a_plain_step(target, int8_draft, caplog):
    """Drafts are guesses: a draft model run that fails mid-proposal is logged and that
    step decodes plainly; later drafts start from what verification settled, and the
    output is still plain greedy's."""
    plain, _ = run(target, [LOOPY], GREEDY)
    gen = target.generator([LOOPY], GREEDY, draft=Model(int8_draft, spinning=False))
    cache = gen.drafter.cache
    real, calls = cache.step, {"n": 0}

    def flaky(appends):
        calls["n"] += 1
        if calls["n"] == 4:  # inside a proposal, after some guesses went in
            raise RuntimeError("draft run failed")
        return real(appends)

    cache.step = flaky
    caplog.set_level(logging.WARNING, logger="gpt2onnx.runtime")
    while not gen.is_done():
        gen.generate_next_token()
    assert list(gen.rows[0].token_ids) == tokens(plain)[0]
    assert "the drafter failed" in caplog.text and gen.speculation.rounds > 1
    gen.close()


def test_a_format1_folder_cannot_speculate(tiny_checkpoint, tmp_path):
    from tests.runtime.format1 import write_format1_folder

    old = Model(write_format1_folder(tiny_checkpoint, tmp_path / "v1"))
    with pytest.raises(InvalidParameterError, match="re-export"):
        old.generator([LOOPY], GREEDY, draft="ngram")


def test_a_draft_folder_is_loaded_once_and_drafters_are_not_shared(target, int8_draft):
    a = target.generator([LOOPY], GREEDY, draft=str(int8_draft))
    b = target.generator([LOOPY], GREEDY, draft=str(int8_draft))
    assert a.drafter.model is b.drafter.model and a.drafter.cache is not b.drafter.cache
    with pytest.raises(InvalidParameterError, match="pass the draft Model"):
        target.generator([LOOPY], GREEDY, draft=a.drafter)
    a.close()
    b.close()
