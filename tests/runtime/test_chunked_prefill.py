"""Chunked prefill and prefix caching in the Generator (``reserve`` + ``prefill``): the
output is the output of a whole-prompt prefill, token for token and log-prob for
log-prob, with any chunk size, with and without stored prefixes, alone and in a full
batch; the prefix store's keys, LRU eviction and byte budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime import GenerationParams, Model, PrefixCache
from gpt2onnx.runtime.generator import Generator

GREEDY = GenerationParams(max_new_tokens=12, stop_on_eos=False)


@pytest.fixture(scope="module")
def model(tiny_fused: Path) -> Model:
    return Model(tiny_fused)


def prompts(model: Model, n: int, shared: int, own: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    vocab = model.manifest.vocab_size
    head = rng.integers(0, vocab, shared).tolist()
    return [head + rng.integers(0, vocab, own).tolist() for _ in range(n)]


def whole(model: Model, ids: list[int], params: GenerationParams) -> tuple[list[int], list]:
    gen = model.generator([ids], params)
    while not gen.is_done():
        gen.generate_next_token()
    row = gen.rows[0]
    assert row is not None
    return row.token_ids, row.prompt_logprobs


def chunked(gen: Generator, ids: list[int], params: GenerationParams, chunk: int) -> int:
    slot = gen.reserve(ids, params)
    while gen.prompt_left(slot):
        gen.prefill([(slot, chunk)])
    return slot


def finish(gen: Generator, slots: list[int]) -> list[list[int]]:
    while not gen.is_done():
        gen.generate_next_token()
    out = []
    for s in slots:
        row = gen.rows[s]
        assert row is not None
        out.append(list(row.token_ids))
        gen.release(s)
    return out


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("prefix", [False, True])
def test_greedy_is_the_whole_prefill_greedy_with_any_chunk_and_prefix_cache(
        model: Model, chunk: int, prefix: bool) -> None:
    ps = prompts(model, 3, shared=40, own=9)
    expected = [whole(model, p, GREEDY)[0] for p in ps]
    store = PrefixCache(block_tokens=8) if prefix else None
    gen = model.generator([], GREEDY, batch_size=3, prefix_cache=store)
    got = [finish(gen, [chunked(gen, p, GREEDY, chunk)])[0] for p in ps]
    assert got == expected
    if prefix:  # the later prompts reused the shared 40 tokens (5 whole blocks)
        assert store is not None and store.stats.hits == 2 * 40
        assert store.stats.hit_lookups == 2


def test_in_a_full_batch_rows_prefilling_in_chunks_beside_decoding_rows(model: Model) -> None:
    """Rows join a running batch chunk by chunk while the others decode; each row gets
    the tokens it gets alone."""
    ps = prompts(model, 4, shared=24, own=7, seed=1)
    params = [GREEDY.with_(max_new_tokens=n) for n in (20, 9, 15, 12)]
    expected = [whole(model, p, q)[0] for p, q in zip(ps, params, strict=True)]
    gen = model.generator([], GREEDY, batch_size=4, prefix_cache=PrefixCache(block_tokens=4))
    slots = [chunked(gen, ps[0], params[0], 7)]
    pending = {k: gen.reserve(ps[k], params[k]) for k in (1, 2, 3)}
    slots += list(pending.values())
    while not gen.is_done() or any(gen.prompt_left(s) for s in pending.values()):
        chunks = [(s, 6) for s in pending.values() if gen.prompt_left(s)][:1]
        if chunks:
            gen.prefill(chunks)
        if not gen.is_done():
            gen.generate_next_token()
    got = []
    for s in slots:
        row = gen.rows[s]
        assert row is not None
        got.append(list(row.token_ids))
    assert got == expected


def test_prompt_logprobs_come_whole_from_chunks(model: Model) -> None:
    ids = prompts(model, 1, shared=0, own=23)[0]
    params = GREEDY.with_(prompt_logprobs=2, max_new_tokens=3)
    tokens, expected = whole(model, ids, params)
    gen = model.generator([], params, batch_size=1, prefix_cache=PrefixCache(block_tokens=4))
    slot = chunked(gen, ids, params, 5)
    row = gen.rows[slot]
    assert row is not None and len(row.prompt_logprobs) == len(ids)
    assert finish(gen, [slot])[0] == tokens
    assert row.prompt_logprobs[0] is None and expected[0] is None
    for a, b in zip(row.prompt_logprobs[1:], expected[1:], strict=True):
        assert a.token_id == b.token_id and a.rank == b.rank
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_an_identical_prompt_waits_for_the_first_and_copies_it(model: Model) -> None:
    ids = prompts(model, 1, shared=0, own=30, seed=3)[0]
    expected = whole(model, ids, GREEDY)[0]
    gen = model.generator([], GREEDY, batch_size=2)
    a = gen.reserve(ids, GREEDY)
    b = gen.reserve(ids, GREEDY)
    assert gen.prompt_left(a) == 30 and gen.prompt_left(b) == 0
    done = gen.prefill([(a, 16)])
    assert done == []
    assert sorted(gen.prefill([(a, 16)])) == [a, b]
    assert finish(gen, [a, b]) == [expected, expected]


def test_a_copy_whose_original_is_released_prefills_on_its_own(model: Model) -> None:
    ids = prompts(model, 1, shared=0, own=20, seed=4)[0]
    expected = whole(model, ids, GREEDY)[0]
    gen = model.generator([], GREEDY, batch_size=2)
    a = gen.reserve(ids, GREEDY)
    b = gen.reserve(ids, GREEDY)
    gen.prefill([(a, 8)])
    gen.release(a)
    assert gen.prompt_left(b) == 20
    gen.prefill([(b, 20)])
    assert finish(gen, [b]) == [expected]


def test_a_failed_chunk_drops_only_its_rows(model: Model, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    ps = prompts(model, 2, shared=0, own=10, seed=5)
    expected = whole(model, ps[0], GREEDY)[0]
    gen = model.generator([], GREEDY, batch_size=2)
    running = chunked(gen, ps[0], GREEDY, 4)
    gen.generate_next_token()
    victim = gen.reserve(ps[1], GREEDY)
    step = type(gen.cache).step

    def broken(self: Any, appends: Any) -> Any:
        if any(a.slot == victim for a in appends):
            raise RuntimeError("injected fault")
        return step(self, appends)

    monkeypatch.setattr(type(gen.cache), "step", broken)
    with pytest.raises(RuntimeError, match="injected"):
        gen.prefill([(victim, 4)])
    assert gen.rows[victim] is None and victim in gen.free_slots
    monkeypatch.undo()
    assert finish(gen, [running]) == [expected]


def test_reserve_refuses_what_add_refuses(model: Model) -> None:
    gen = model.generator([], GREEDY, batch_size=1)
    with pytest.raises(InvalidParameterError, match="prompt is empty"):
        gen.reserve([], GREEDY)
    gen.reserve([1, 2, 3], GREEDY)
    with pytest.raises(RuntimeError, match="not free"):
        gen.reserve([1, 2, 3], GREEDY)


# ---- the store --------------------------------------------------------------------------

class FakeCache:
    """What PrefixCache needs of a FusedCache, on plain arrays: [slots, tokens] of floats."""

    dtype = np.float32

    def __init__(self, slots: int = 2, capacity: int = 64) -> None:
        self.data = np.zeros((slots, capacity), np.float32)
        self.lengths = np.zeros(slots, np.int64)

    def block_shape(self, tokens: int) -> tuple[int, ...]:
        return (1, 1, tokens, 1)

    def read_tokens(self, slot: int, start: int, end: int, out: np.ndarray) -> None:
        out[0, 0, :, 0] = self.data[slot, start:end]

    def write_tokens(self, slot: int, start: int, block: np.ndarray) -> None:
        end = start + block.shape[2]
        self.data[slot, start:end] = block[0, 0, :, 0]
        self.lengths[slot] = end


def test_keys_name_whole_prefixes_not_blocks() -> None:
    store = PrefixCache(block_tokens=2)
    a = store.keys([1, 2, 3, 4], 2)
    b = store.keys([9, 9, 3, 4], 2)
    assert a[1] != b[1]  # the same second block after another first block
    assert store.keys([1, 2, 3, 4, 5], 2) == a


def test_store_and_load_round_trip_keep_the_last_token_for_a_run() -> None:
    cache = FakeCache()
    ids = list(range(10))
    cache.data[0, :10] = np.arange(10) * 1.5
    store = PrefixCache(block_tokens=4)
    store.store(ids, cache, 0, 10)  # blocks [0, 4) and [4, 8)
    assert len(store) == 2
    assert store.load(ids[:8], cache, 1) == 4  # 8 tokens: the last must run, so one block
    assert store.load(ids, cache, 1) == 8
    np.testing.assert_array_equal(cache.data[1, :8], cache.data[0, :8])
    assert store.load([5, *ids[1:]], cache, 1) == 0  # another first token: no match


def test_lru_eviction_keeps_the_budget_and_the_recent_prefix() -> None:
    cache = FakeCache(slots=1)
    block_bytes = 4 * 4  # 4 fp32 tokens
    store = PrefixCache(block_tokens=4, budget_bytes=3 * block_bytes)
    old, new = list(range(100, 109)), list(range(200, 209))
    store.store(old, cache, 0, 8)
    store.store(new, cache, 0, 8)  # four blocks for a budget of three: the oldest goes
    assert store.bytes <= store.budget_bytes and len(store) == 3
    assert store.stats.evicted_blocks == 1
    assert store.load(new, cache, 0) == 8
    # The old prefix lost its tail, not its head: a prefix's first blocks go last, since
    # every longer match needs them.
    assert store.load(old, cache, 0) == 4


def test_bad_store_settings_are_refused() -> None:
    with pytest.raises(InvalidParameterError, match="block_tokens"):
        PrefixCache(block_tokens=0)
    with pytest.raises(InvalidParameterError, match="budget_bytes"):
        PrefixCache(budget_bytes=-1)


def test_rows_asking_other_prompt_logprobs_do_not_copy_each_other(model: Model) -> None:
    ids = prompts(model, 1, shared=0, own=12, seed=6)[0]
    gen = model.generator([], GREEDY, batch_size=3)
    a = gen.reserve(ids, GREEDY.with_(prompt_logprobs=1))
    b = gen.reserve(ids, GREEDY.with_(prompt_logprobs=5))
    c = gen.reserve(ids, GREEDY.with_(prompt_logprobs=1))
    assert (gen.prompt_left(a), gen.prompt_left(b), gen.prompt_left(c)) == (12, 12, 0)
    gen.prefill([(a, 12), (b, 12)])
    rows = [gen.rows[s] for s in (a, b, c)]
    assert [len(r.prompt_logprobs[1].top) for r in rows] == [1, 5, 1]  # type: ignore[union-attr]


def test_add_rows_prefills_repeats_where_slots_cannot_be_copied(
        model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA caches cannot copy slots: every repeated prompt then runs itself."""
    from gpt2onnx.runtime.cache import FusedCache

    ids = prompts(model, 1, shared=0, own=9, seed=7)[0]
    expected = whole(model, ids, GREEDY)[0]
    monkeypatch.setattr(FusedCache, "supports_slot_copy", property(lambda self: False))
    gen = model.generator([], GREEDY, batch_size=2)
    slots = gen.add_rows([ids, ids], [GREEDY, GREEDY])
    assert all(len(gen.rows[s].token_ids) == 1 for s in slots)  # type: ignore[union-attr]
    assert finish(gen, slots) == [expected, expected]


def test_add_rows_beside_an_identical_prompt_still_prefilling(model: Model) -> None:
    ids = prompts(model, 1, shared=0, own=20, seed=8)[0]
    expected = whole(model, ids, GREEDY)[0]
    gen = model.generator([], GREEDY, batch_size=3)
    older = gen.reserve(ids, GREEDY)
    gen.prefill([(older, 5)])
    slots = gen.add_rows([ids, ids], [GREEDY, GREEDY])  # first tokens now, not later
    assert all(len(gen.rows[s].token_ids) == 1 for s in slots)  # type: ignore[union-attr]
    while gen.prompt_left(older):
        gen.prefill([(older, 5)])
    assert finish(gen, [older, *slots]) == [expected] * 3
