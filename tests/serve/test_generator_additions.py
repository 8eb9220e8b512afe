"""The runtime pieces the server added (they belong with tests/runtime, which other work
owns right now): ``Generator.add_rows`` and per-token log-probs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime import GenerationParams, Model
from gpt2onnx.runtime.cache import Append
from gpt2onnx.runtime.sampling import log_softmax

GREEDY = GenerationParams(max_new_tokens=8, stop_on_eos=False)
PROMPTS = ["Alpha beta", "A much longer prompt than the others", "x", "Gamma"]


def run_to_end(gen: Any) -> None:
    while not gen.is_done():
        gen.generate_next_token()


def test_add_rows_matches_rows_run_alone(ref_model: Model) -> None:
    alone = [ref_model.generate(p, GREEDY).token_ids for p in PROMPTS]
    gen = ref_model.generator([], GREEDY, batch_size=6)
    gen.add(ref_model.encode("Occupies slot 0"), GREEDY)
    gen.add(ref_model.encode("Occupies slot 1"), GREEDY)
    gen.release(0)  # free slots now 0, 2, 3, 4, 5: two runs of adjacent slots
    slots = gen.add_rows([ref_model.encode(p) for p in PROMPTS], [GREEDY] * len(PROMPTS))
    assert slots == [0, 2, 3, 4]
    run_to_end(gen)
    assert [gen.rows[s].token_ids for s in slots] == alone


def test_add_rows_leaves_no_row_behind_on_failure(ref_model: Model,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    gen = ref_model.generator([], GREEDY, batch_size=4)
    gen.add(ref_model.encode("Occupies slot 0"), GREEDY)
    gen.add(ref_model.encode("Occupies slot 1"), GREEDY)
    gen.release(0)  # free slots 0, 2, 3: new rows go in two runs, [0] and [2, 3]
    original, calls = gen.cache._run_many, []

    def second_run_fails(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(gen.cache, "_run_many", second_run_fails)
    with pytest.raises(RuntimeError, match="injected"):
        gen.add_rows([[1, 2], [3, 4], [5, 6]], [GREEDY] * 3)
    assert len(calls) == 2
    assert gen.free_slots == [0, 2, 3]  # the first run's row was released again
    assert gen.rows[1] is not None and not gen.rows[1].done  # the running row is untouched


def test_logprobs_are_the_models_log_softmax(ref_model: Model) -> None:
    params = GenerationParams(max_new_tokens=1, logprobs=4)
    ids = ref_model.encode("Hello there")
    gen = ref_model.generator([], params, batch_size=1)
    slot = gen.add(ids, params)
    (entry,) = gen.rows[slot].logprobs
    logits = ref_model.cache(1).step([Append(0, ids)]).logits(0)[-1].copy()
    expected = log_softmax(logits)
    assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-5)
    top_ids = np.argsort(-expected)[:4]
    assert [t for t, _ in entry.top] == top_ids.tolist()


def test_logprobs_validation_and_default() -> None:
    with pytest.raises(InvalidParameterError, match=r"logprobs must be in \[0, 20\]"):
        GenerationParams(logprobs=21)
    with pytest.raises(InvalidParameterError, match="logprobs must be an integer"):
        GenerationParams(logprobs=True)
    assert GenerationParams().logprobs is None


def test_repeated_prompt_is_prefilled_once_and_copied(ref_model: Model,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI's n > 1 and identical prompts arriving together: one prefill row per distinct
    prompt; the copies decode exactly as rows run alone do."""
    a, b = ref_model.encode("Alpha beta"), ref_model.encode("Gamma delta epsilon")
    alone = {p: ref_model.generate(p, GREEDY).token_ids for p in ("Alpha beta",
                                                                   "Gamma delta epsilon")}
    gen = ref_model.generator([], GREEDY, batch_size=6)
    run_rows: list[int] = []
    original = gen.cache._run_many  # the run that puts prompts into empty slots

    def counting(appends: Any, *args: Any, **kwargs: Any) -> None:
        run_rows.append(len(appends))
        return original(appends, *args, **kwargs)

    monkeypatch.setattr(gen.cache, "_run_many", counting)
    slots = gen.add_rows([a, b, a, a, b], [GREEDY] * 5)
    assert run_rows == [2]  # a and b, in adjacent slots, one run
    assert slots[:2] == [0, 1] and sorted(slots) == [0, 1, 2, 3, 4]
    for k in (2, 3):
        for i in range(len(gen.cache.names)):
            np.testing.assert_array_equal(gen.cache.row_kv(i, slots[k]),
                                          gen.cache.row_kv(i, slots[0]))
    assert list(gen.cache.lengths[slots]) == [len(a), len(b), len(a), len(a), len(b)]
    run_to_end(gen)
    texts = ["Alpha beta", "Gamma delta epsilon", "Alpha beta", "Alpha beta",
             "Gamma delta epsilon"]
    assert [gen.rows[s].token_ids for s in slots] == [alone[t] for t in texts]


def test_copies_sample_independently_with_their_own_seeds(ref_model: Model) -> None:
    ids = ref_model.encode("Once upon a time")
    params = [GenerationParams(max_new_tokens=12, temperature=1.0, seed=s, stop_on_eos=False,
                               logprobs=2) for s in (1, 2, 1)]
    alone = [ref_model.generate(ids, p) for p in params]
    gen = ref_model.generator([], GREEDY, batch_size=4)
    slots = gen.add_rows([ids] * 3, params)
    run_to_end(gen)
    got = [gen.rows[s] for s in slots]
    assert [r.token_ids for r in got] == [r.token_ids for r in alone]
    assert got[0].token_ids == got[2].token_ids != got[1].token_ids  # seed 1 twice
    first = [r.logprobs[0] for r in got]  # the shared prefill's logits, for every copy
    assert first[0].top == first[1].top == first[2].top


def test_standard_layout_has_no_slot_copy(tiny_standard: Any) -> None:
    model = Model(tiny_standard)
    assert not model.cache(2).supports_slot_copy
