"""Generation through the runtime against transformers' GPT2LMHeadModel.generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2onnx.runtime import GenerationParams, Model

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy", "A", "Ünïcödé text: 世界"]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module", params=["standard", "fused"])
def model(request, tiny_standard, tiny_fused) -> Model:
    return Model(tiny_standard if request.param == "standard" else tiny_fused)


def _hf_greedy(ref, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                           dtype=torch.long), max_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_matches_transformers_generate(model, reference):
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        ours = model.generate(ids, max_new_tokens=24, stop_on_eos=False)
        assert ours.token_ids == _hf_greedy(reference, ids, 24), prompt
        assert ours.prompt_token_ids == ids
        assert ours.finish_reason == "length"
        assert ours.text == model.decode(ours.token_ids)


def test_batch_gives_each_prompt_its_solo_tokens(model):
    params = GenerationParams(max_new_tokens=16, stop_on_eos=False)
    alone = [model.generate(p, params).token_ids for p in PROMPTS]
    batched = [r.token_ids for r in model.generate_batch(PROMPTS, params)]
    assert batched == alone


def test_sampling_is_reproducible_per_seed(model):
    params = GenerationParams(max_new_tokens=20, temperature=1.0, top_k=100, top_p=0.95,
                              seed=7, stop_on_eos=False)
    first = model.generate("Hello", params).token_ids
    assert model.generate("Hello", params).token_ids == first
    others = {tuple(model.generate("Hello", params.with_(seed=s)).token_ids) for s in range(4)}
    assert len(others) > 1, "different seeds should give different samples"
    # Batched rows with their own seeds draw what they draw alone.
    rows = model.generate_batch(["Hello", "Hello"], [params, params.with_(seed=3)])
    assert rows[0].token_ids == first
    assert rows[1].token_ids == model.generate("Hello", params.with_(seed=3)).token_ids


def test_top_k_1_is_greedy(model):
    greedy = model.generate("Hello", max_new_tokens=12, stop_on_eos=False).token_ids
    sampled = model.generate("Hello", max_new_tokens=12, temperature=0.7, top_k=1, seed=1,
                             stop_on_eos=False).token_ids
    assert sampled == greedy


def test_repetition_penalty_matches_transformers(model, reference):
    ids = model.encode("Hello world")
    ours = model.generate(ids, max_new_tokens=16, repetition_penalty=1.5, stop_on_eos=False)
    with torch.no_grad():
        hf = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                dtype=torch.long), max_new_tokens=16, do_sample=False,
                                repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)
    assert ours.token_ids == hf[0, len(ids):].tolist()


def test_stops_at_eos(model):
    base = model.generate("Hello", max_new_tokens=12, stop_on_eos=False)
    eos = base.token_ids[5]
    model.manifest.eos_token_id, saved = eos, model.manifest.eos_token_id
    try:
        got = model.generate("Hello", max_new_tokens=12)
    finally:
        model.manifest.eos_token_id = saved
    first = base.token_ids.index(eos)
    assert got.token_ids == base.token_ids[:first + 1]
    assert got.finish_reason == "stop"


def test_stop_string_cuts_the_text(model):
    base = model.generate("Hello", max_new_tokens=20, stop_on_eos=False)
    stop = base.text[len(base.text) // 2:len(base.text) // 2 + 3]
    assert stop
    got = model.generate("Hello", max_new_tokens=20, stop=[stop], stop_on_eos=False)
    assert got.finish_reason == "stop"
    assert got.text == base.text[:base.text.index(stop)]
    streamed = "".join(model.stream("Hello", max_new_tokens=20, stop=[stop], stop_on_eos=False))
    assert streamed == got.text


def test_stream_concatenates_to_the_text(model):
    pieces = list(model.stream("Ünïcödé", max_new_tokens=30, stop_on_eos=False))
    full = model.generate("Ünïcödé", max_new_tokens=30, stop_on_eos=False).text
    assert "".join(pieces) == full
    assert all(pieces)


def test_streaming_decoder_never_splits_a_character(model):
    """Feed the tokens of multi-byte text one by one: each piece is whole characters."""
    text = " héllo 世界 🙂 naïve — ok"
    ids = model.encode(text)
    gen = model.generator(["x"], GenerationParams(max_new_tokens=len(ids) + 1, stop_on_eos=False))
    row = gen.rows[0]
    pieces = []
    for t in ids:
        gen._advance(row, t)
        pieces.append(gen.stream_text(0))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_context_overflow_truncates_when_asked(model):
    ctx = model.context_length
    ids = list(np.random.default_rng(0).integers(0, 50000, size=ctx + 10))
    got = model.generate([int(t) for t in ids], max_new_tokens=5, on_overflow="truncate",
                         stop_on_eos=False)
    assert len(got.prompt_token_ids) == ctx - 1
    assert got.prompt_token_ids == [int(t) for t in ids[-(ctx - 1):]]
    assert len(got.token_ids) == 1 and got.finish_reason == "length"
    near = model.generate([1] * (ctx - 3), max_new_tokens=10, on_overflow="truncate",
                          stop_on_eos=False)
    assert len(near.token_ids) == 3


def test_timings_are_reported(model):
    got = model.generate("Hello", max_new_tokens=5, stop_on_eos=False)
    assert got.prefill_ms > 0 and got.decode_ms_per_token > 0
    assert set(got.to_dict()) == {"text", "token_ids", "prompt_token_ids", "finish_reason",
                                  "timings"}
