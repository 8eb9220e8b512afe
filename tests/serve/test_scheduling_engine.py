"""The engine as a token-budget scheduler: chunked prefill interleaved with decoding,
prefix caching, requests with more rows than slots, row and token queue limits, faults
that fail only the rows they hit, and the scheduler's metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gpt2onnx.runtime import GenerationParams
from gpt2onnx.runtime.generator import Generator
from gpt2onnx.serve import Engine, ModelRunError, QueueFullError
from gpt2onnx.serve.completion import EngineRequest, RowSpec
from tests.serve.helpers import make_app, slow_steps

GREEDY = dict(temperature=0.0, stop_on_eos=False)
SYSTEM = ("You are a helpful assistant who answers questions about the weather, the "
          "garden and the kitchen, briefly and kindly. ")
QUESTIONS = ["What should I plant in May?", "Is it going to rain today?",
             "How long do I boil an egg?", "Why is the sky blue?",
             "What is a good soup for winter?", "Can I freeze basil?"]


def run_all(engine: Engine, prompts: list[str], params: GenerationParams) -> list[str]:
    async def together() -> list:
        return await asyncio.gather(*(engine.complete(engine.request(p, params))
                                      for p in prompts))

    return [c.choices[0].text for c in asyncio.run(together())]


def counter(engine: Engine, name: str) -> float:
    metric = getattr(engine.metrics, name)
    return metric._value.get()


@pytest.mark.parametrize("config", [
    dict(prefill_chunk=4, prefix_block_tokens=4),  # small chunks, prefix cache on
    dict(prefill_chunk=4, prefix_cache_mb=0),  # chunks only
    dict(prefill_chunk=4, prefix_block_tokens=4, mixed_runs=False),  # separate runs
    dict(prefill_chunk=4096, max_step_tokens=4096, prefix_block_tokens=8),  # prefix only
    dict(prefill_chunk=4096, max_step_tokens=4096, prefix_cache_mb=0),  # neither
], ids=["chunks+prefix", "chunks", "chunks+prefix, separate runs", "prefix", "neither"])
def test_greedy_is_unchanged_by_chunking_and_prefix_caching_alone_and_in_a_full_batch(
        make_engine: Callable[..., Engine], greedy_text: Callable[..., str],
        config: dict[str, Any]) -> None:
    engine = make_engine(max_batch_size=4, **config)
    params = GenerationParams(max_new_tokens=10, **GREEDY)
    prompts = [SYSTEM + q for q in QUESTIONS]
    alone = [engine.complete_sync(engine.request(p, params)).choices[0].text
             for p in prompts[:2]]
    batched = run_all(engine, prompts, params)  # six requests for four slots
    expected = [greedy_text(p, 10, **GREEDY) for p in prompts]
    assert alone == expected[:2] and batched == expected
    if config.get("prefix_cache_mb", 1):
        assert counter(engine, "prefix_hit_tokens") > 0


def test_prefix_hits_are_counted_and_save_prefill(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_batch_size=2, prefix_block_tokens=4)
    params = GenerationParams(max_new_tokens=2, **GREEDY)
    ids = engine.model.encode(SYSTEM)
    for q in QUESTIONS[:3]:
        engine.complete_sync(engine.request(SYSTEM + q, params))
    hits = counter(engine, "prefix_hit_tokens")
    queried = counter(engine, "prefix_queried_tokens")
    assert hits >= 2 * (len(ids) // 4 - 1) * 4  # the 2nd and 3rd reuse the system prompt
    assert queried > hits
    prefilled = counter(engine, "prompt_tokens")
    total = sum(len(engine.model.encode(SYSTEM + q)) for q in QUESTIONS[:3])
    assert prefilled == total - hits  # what came from the store was not run
    text = engine.metrics.render()[0].decode()
    for name in ("gpt2onnx_prefix_cache_hit_tokens_total", "gpt2onnx_prefill_chunks_total",
                 "gpt2onnx_step_budget_used_bucket", "gpt2onnx_prefix_cache_bytes"):
        assert name in text


def test_rows_that_end_at_their_first_token_are_marked_for_the_idle_step(
        make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler holds later requests back in an idle step only behind a request that
    decodes; the engine says which rows do (max_tokens above 1)."""
    from gpt2onnx.serve.scheduler import Scheduler

    seen: list[tuple[int, bool]] = []
    enqueue = Scheduler.enqueue

    def spy(self: Scheduler, seqs: Any) -> None:
        seqs = list(seqs)
        seen.extend((s.prompt_tokens, s.decodes) for s in seqs)
        enqueue(self, seqs)

    monkeypatch.setattr(Scheduler, "enqueue", spy)
    engine = make_engine(max_batch_size=2)
    seen.clear()  # not the warm-up's
    for n in (0, 1, 2, 8):
        engine.complete_sync(engine.request("Why is the sky blue?",
                                            GenerationParams(max_new_tokens=n, **GREEDY)))
    assert [d for _, d in seen] == [False, False, True, True]


@pytest.mark.parametrize("mixed", [True, False], ids=["one run", "separate runs"])
def test_a_long_prompt_is_chunked_between_decode_steps(make_engine: Callable[..., Engine],
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       greedy_text: Callable[..., str],
                                                       mixed: bool) -> None:
    engine = make_engine(max_batch_size=2, prefill_chunk=8, prefix_cache_mb=0,
                         mixed_runs=mixed)
    assert engine.model.mixed is mixed
    calls: list[tuple[str, int]] = []
    prefill, step = Generator.prefill, Generator.generate_next_token
    both = Generator.prefill_and_decode

    def spy_prefill(self: Generator, chunks: Any) -> list[int]:
        calls.append(("prefill", sum(n for _, n in chunks)))
        return prefill(self, chunks)

    def spy_step(self: Generator) -> np.ndarray:
        calls.append(("step", 0))
        return step(self)

    def spy_both(self: Generator, chunks: Any) -> Any:
        calls.append(("step", 0))  # the decode step runs in the same model run
        calls.append(("prefill", sum(n for _, n in chunks)))
        return both(self, chunks)

    monkeypatch.setattr(Generator, "prefill", spy_prefill)
    monkeypatch.setattr(Generator, "generate_next_token", spy_step)
    monkeypatch.setattr(Generator, "prefill_and_decode", spy_both)
    params = GenerationParams(max_new_tokens=40, **GREEDY)
    runner = engine.stream_sync(engine.request("Keep going", params))
    next(runner)  # decoding now
    long_prompt = " ".join(["the weather in the garden"] * 8)
    n = len(engine.model.encode(long_prompt))
    long = engine.complete_sync(engine.request(long_prompt, GenerationParams(max_new_tokens=3,
                                                                             **GREEDY)))
    text = "".join(d.text for deltas in runner for d in deltas)
    chunk_calls = [k for k, (kind, size) in enumerate(calls) if kind == "prefill" and size]
    sizes = [calls[k][1] for k in chunk_calls]
    assert sizes[-(n // 8 + (n % 8 > 0)):] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    # Between two chunks of the long prompt, the running row took a step.
    for a, b in zip(chunk_calls[-4:], chunk_calls[-3:], strict=False):
        assert any(kind == "step" for kind, _ in calls[a + 1:b])
    assert long.choices[0].text == greedy_text(long_prompt, 3, **GREEDY)
    assert text  # the running row kept streaming
    assert counter(engine, "prefill_chunks") >= n // 8
    # With the mixed graph every chunk shared its step's run with the running row.
    assert (counter(engine, "mixed_runs") >= n // 8) is mixed


def test_a_request_with_more_rows_than_slots_is_queued_row_by_row(
        make_engine: Callable[..., Engine], greedy_text: Callable[..., str]) -> None:
    engine = make_engine(max_batch_size=4)
    params = GenerationParams(max_new_tokens=6, **GREEDY)
    prompts = [f"Prompt number {i} says" for i in range(20)]
    request = EngineRequest(tuple(RowSpec(tuple(engine.model.encode(p)), params)
                                  for p in prompts))
    completion = engine.complete_sync(request)
    assert [c.index for c in completion.choices] == list(range(20))
    assert [c.text for c in completion.choices] == [greedy_text(p, 6, **GREEDY)
                                                    for p in prompts]
    assert engine.stats().free_slots == 4


def test_twenty_prompts_over_http(module_engine: Engine, greedy_text: Callable[..., str]
                                  ) -> None:
    """langchain's OpenAI.generate() sends up to 20 prompts per request, lm-eval a batch:
    more rows than the 8 slots is queued work, not a 400."""
    prompts = [f"Tell me about item {i}" for i in range(20)]
    with TestClient(make_app(module_engine)) as client:
        r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 4,
                                                 "temperature": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(20))
    assert [c["text"] for c in choices] == [greedy_text(p, 4, temperature=0.0)
                                            for p in prompts]


def test_the_standard_layout_runs_a_big_request_in_batches(
        tiny_standard: Path, make_engine: Callable[..., Engine]) -> None:
    from gpt2onnx.runtime import Model

    engine = make_engine(tiny_standard, max_batch_size=2)
    params = GenerationParams(max_new_tokens=5, **GREEDY)
    prompts = ["One", "Two two", "Three three three", "Four", "Five five"]
    request = EngineRequest(tuple(RowSpec(tuple(engine.model.encode(p)), params)
                                  for p in prompts))
    reference = Model(tiny_standard)
    assert [c.text for c in engine.complete_sync(request).choices] == [
        reference.generate(p, params).text for p in prompts]


def test_queue_limits_count_rows_and_tokens(make_engine: Callable[..., Engine],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    slow_steps(monkeypatch, 0.01)
    engine = make_engine(max_batch_size=1, max_queue=2, max_queued_tokens=1000)
    params = GenerationParams(max_new_tokens=100, **GREEDY)
    three = engine.stream_sync(EngineRequest.of(engine.model.encode("Three rows"), params, 3))
    next(three)  # one row runs, two wait: the queue is full
    with pytest.raises(QueueFullError, match="at capacity"):
        engine.stream_sync(engine.request("One more", params))
    three.cancel()
    engine2 = make_engine(max_batch_size=1, max_queue=10, max_queued_tokens=8)
    first = engine2.stream_sync(engine2.request("A", params))
    next(first)
    with pytest.raises(QueueFullError, match="prompt tokens"):
        engine2.stream_sync(engine2.request("a prompt of more than eight tokens, surely so",
                                            params))
    first.cancel()
    too_many = EngineRequest.of(engine.model.encode("x"), params, 1)
    too_many = EngineRequest(too_many.rows * (engine.max_rows + 1))
    with pytest.raises(Exception, match="queues at most 3 per request"):
        engine.stream_sync(too_many)


@pytest.mark.parametrize("mixed", [False, True], ids=["separate runs", "one run"])
def test_a_failed_prefill_fails_only_the_requests_in_its_run(
        make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch,
        greedy_text: Callable[..., str], mixed: bool) -> None:
    engine = make_engine(max_batch_size=4, prefill_chunk=4, mixed_runs=mixed)
    from gpt2onnx.runtime.cache import FusedCache
    from gpt2onnx.runtime.mixed_cache import MixedFusedCache

    kind = MixedFusedCache if mixed else FusedCache
    original = kind.step
    doomed = engine.model.encode("This prompt breaks the model run")

    def flaky(self: FusedCache, appends: Any) -> Any:
        if any(list(a.tokens) == doomed[:4] for a in appends):  # its first chunk's run
            raise RuntimeError("injected prefill fault")
        return original(self, appends)

    monkeypatch.setattr(kind, "step", flaky)
    params = GenerationParams(max_new_tokens=30, **GREEDY)
    good = engine.stream_sync(engine.request("A healthy request", params))
    next(good)
    bad = engine.stream_sync(engine.request(doomed, params))
    with pytest.raises(ModelRunError, match="injected prefill fault"):
        for _ in bad:
            pass
    if mixed:
        # The decoding row shared the failed run, so its request failed with it.
        with pytest.raises(ModelRunError, match="injected prefill fault"):
            for _ in good:
                pass
        assert engine.metrics.requests.labels("error")._value.get() == 2
    else:
        text = "".join(d.text for deltas in good for d in deltas)
        assert text.endswith(greedy_text("A healthy request", 30, **GREEDY)[-10:])
        assert engine.metrics.requests.labels("error")._value.get() == 1
        assert engine.metrics.requests.labels("success")._value.get() == 1
    # The engine serves on: a new request gets exactly its greedy text.
    again = engine.complete_sync(engine.request("A healthy request", params))
    assert again.choices[0].text == greedy_text("A healthy request", 30, **GREEDY)


def test_a_failed_admission_fails_only_its_request(make_engine: Callable[..., Engine],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   greedy_text: Callable[..., str]) -> None:
    engine = make_engine(max_batch_size=2)
    original = Generator.reserve
    doomed = engine.model.encode("No slot for this one")

    def broken(self: Generator, prompt_ids: Any, params: Any, slot: Any = None) -> int:
        if list(prompt_ids) == doomed:
            raise MemoryError("injected admission fault")
        return original(self, prompt_ids, params, slot)

    monkeypatch.setattr(Generator, "reserve", broken)
    params = GenerationParams(max_new_tokens=5, **GREEDY)
    with pytest.raises(ModelRunError, match="injected admission fault"):
        engine.complete_sync(engine.request(doomed, params))
    assert engine.status == "ready" and engine.stats().free_slots == 2
    after = engine.complete_sync(engine.request("Still serving", params))
    assert after.choices[0].text == greedy_text("Still serving", 5, **GREEDY)


def test_a_request_that_starts_at_once_is_not_held_to_the_token_limit(
        make_engine: Callable[..., Engine], greedy_text: Callable[..., str]) -> None:
    engine = make_engine(max_batch_size=2, max_queued_tokens=2)
    params = GenerationParams(max_new_tokens=3, **GREEDY)
    prompt = "A prompt of more than two tokens"
    assert engine.complete_sync(engine.request(prompt, params)).choices[0].text == \
        greedy_text(prompt, 3, **GREEDY)


def test_the_stall_budget_changes_chunk_sizes_not_outputs(
        make_engine: Callable[..., Engine], greedy_text: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-stall: chunk sizes follow measured run times, outputs stay greedy's."""
    # Decode steps of at least 5 ms: the tiny model can otherwise finish the first
    # request's 40 tokens before the long prompt arrives, which then runs whole in an
    # idle step (a CI run saw 3 chunks).
    slow_steps(monkeypatch, 0.005)
    engine = make_engine(max_batch_size=4, prefill_chunk=16, max_stall=1.2)
    short = GenerationParams(max_new_tokens=40, **GREEDY)
    long_prompt = [int(t) for t in np.random.default_rng(3).integers(300, 5000, 90)]
    request = EngineRequest((RowSpec(tuple(engine.model.encode("Running along")), short),
                             RowSpec(tuple(engine.model.encode("Another one")), short)))

    async def run() -> list[str]:
        first = asyncio.ensure_future(engine.complete(request))
        while len(engine.scheduler.running) < 2 and not first.done():  # both rows decode
            await asyncio.sleep(0.001)
        late = EngineRequest((RowSpec(tuple(long_prompt),
                                      GenerationParams(max_new_tokens=8, **GREEDY)),))
        done = await asyncio.gather(first, engine.complete(late))
        return [c.text for d in done for c in d.choices]

    texts = asyncio.run(run())
    assert texts == [greedy_text("Running along", 40, temperature=0.0),
                     greedy_text("Another one", 40, temperature=0.0),
                     greedy_text(long_prompt, 8, temperature=0.0)]
    assert engine._stall is not None and engine._stall.decode_s is not None
    assert engine.metrics.prefill_chunks._value.get() >= 90 / 16
