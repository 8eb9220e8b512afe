"""The engine without HTTP: sync and async APIs, continuous batching, cancellation,
timeouts, faults, overload, shutdown, and the standard-layout fallback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpt2onnx.errors import InvalidParameterError, PromptTooLongError
from gpt2onnx.runtime import GenerationParams
from gpt2onnx.runtime.generator import Generator
from gpt2onnx.serve import (
    Engine,
    ModelRunError,
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
)
from tests.serve.helpers import slow_steps, wait_until

GREEDY = dict(temperature=0.0, stop_on_eos=False)


def test_sync_completion_is_the_single_greedy_run(module_engine: Engine,
                                                   greedy_text: Callable[..., str]) -> None:
    request = module_engine.request("Hello there", GenerationParams(max_new_tokens=12, **GREEDY))
    completion = module_engine.complete_sync(request)
    (choice,) = completion.choices
    assert choice.text == greedy_text("Hello there", 12, **GREEDY)
    assert choice.finish_reason == "length"
    assert completion.completion_tokens == 12
    assert completion.prompt_tokens == len(module_engine.model.encode("Hello there"))


def test_async_stream_pieces_add_up_to_the_single_run(module_engine: Engine,
                                                      greedy_text: Callable[..., str]) -> None:
    request = module_engine.request("Once upon", GenerationParams(max_new_tokens=20, **GREEDY))

    async def read() -> list:
        return [deltas async for deltas in module_engine.stream(request)]

    items = asyncio.run(read())
    deltas = [d for item in items for d in item]
    assert all(len({d.index for d in item}) == len(item) for item in items)  # merged per read
    assert "".join(d.text for d in deltas) == greedy_text("Once upon", 20, **GREEDY)
    assert sum(len(d.token_ids) for d in deltas) == 20
    assert [d.finish_reason for d in deltas][-1] == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_rows_join_and_leave_a_running_batch(module_engine: Engine,
                                             greedy_text: Callable[..., str]) -> None:
    """A short request joins while a long one decodes, finishes first and leaves; both get
    exactly their single-run text."""
    engine = module_engine
    long = engine.request("It was a dark", GenerationParams(max_new_tokens=100, **GREEDY))
    short = engine.request("Hello", GenerationParams(max_new_tokens=5, **GREEDY))
    finished: list[str] = []

    async def run() -> tuple[str, str]:
        long_stream = engine.stream(long)
        first = await anext(long_stream)  # the long request holds a slot and is decoding

        async def rest_of_long() -> str:
            text = "".join(d.text for d in first)
            async for deltas in long_stream:
                text += "".join(d.text for d in deltas)
            finished.append("long")
            return text

        async def whole_short() -> str:
            completion = await engine.complete(short)
            finished.append("short")
            return completion.choices[0].text

        return await asyncio.gather(rest_of_long(), whole_short())

    long_text, short_text = asyncio.run(run())
    assert finished == ["short", "long"]
    assert long_text == greedy_text("It was a dark", 100, **GREEDY)
    assert short_text == greedy_text("Hello", 5, **GREEDY)
    assert wait_until(lambda: engine.stats().free_slots == engine.config.max_batch_size)


def test_n_choices_sample_with_derived_seeds(module_engine: Engine) -> None:
    params = GenerationParams(max_new_tokens=10, temperature=1.0, seed=7)
    many = module_engine.complete_sync(module_engine.request("The", params, n=3))
    again = module_engine.complete_sync(module_engine.request("The", params, n=3))
    alone = module_engine.complete_sync(module_engine.request("The", params))
    texts = [c.text for c in many.choices]
    assert texts == [c.text for c in again.choices]  # reproducible as a whole
    assert texts[0] == alone.choices[0].text  # choice 0 samples with the seed itself
    assert len(set(texts)) > 1  # the others with seed + j
    assert many.prompt_tokens == alone.prompt_tokens  # one prompt, counted once


def test_logprobs_are_recorded_per_token(module_engine: Engine) -> None:
    params = GenerationParams(max_new_tokens=6, logprobs=3, **GREEDY)
    (choice,) = module_engine.complete_sync(module_engine.request("Hello", params)).choices
    assert len(choice.logprobs) == len(choice.token_ids) == 6
    for token, entry in zip(choice.token_ids, choice.logprobs, strict=True):
        assert entry.token_id == token
        assert len(entry.top) == 3
        assert entry.top[0] == (token, pytest.approx(entry.logprob))  # greedy: the argmax
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.logprob <= 0


def test_bad_requests_raise_at_submit(module_engine: Engine) -> None:
    too_long = [1] * (module_engine.model.context_length + 1)
    with pytest.raises(PromptTooLongError):
        module_engine.stream_sync(module_engine.request(too_long, GenerationParams()))
    with pytest.raises(InvalidParameterError, match=r"n must be an integer in \[1, 8\]"):
        module_engine.stream_sync(module_engine.request("Hi", GenerationParams(), n=9))


def test_cancel_frees_the_slots_at_the_next_step(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_batch_size=4)
    params = GenerationParams(max_new_tokens=120, **GREEDY)
    stream = engine.stream_sync(engine.request("Cancel me", params, n=2))
    next(stream)
    assert engine.stats().running_rows == 2
    stream.cancel()
    assert wait_until(lambda: engine.stats().free_slots == 4 and engine.stats().running == 0)
    assert engine.metrics.requests.labels("cancelled")._value.get() == 1


def test_timeout_fails_the_request_and_frees_its_slot(make_engine: Callable[..., Engine],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    slow_steps(monkeypatch, 0.01)
    engine = make_engine(max_batch_size=2, request_timeout=0.3)
    stream = engine.stream_sync(engine.request("Slow", GenerationParams(max_new_tokens=120,
                                                                        **GREEDY)))
    with pytest.raises(RequestTimeoutError, match="timed out"):
        for _ in stream:
            pass
    assert wait_until(lambda: engine.stats().free_slots == 2)
    assert engine.metrics.requests.labels("timeout")._value.get() == 1


def test_a_failed_run_fails_its_batch_and_the_engine_keeps_serving(
        make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch,
        greedy_text: Callable[..., str]) -> None:
    engine = make_engine(max_batch_size=4)
    original = Generator.generate_next_token
    faults = []

    def flaky(self: Generator) -> np.ndarray:
        if not faults and int(self._active.sum()) >= 2:  # once both requests are running
            faults.append(1)
            raise RuntimeError("injected fault")
        return original(self)

    monkeypatch.setattr(Generator, "generate_next_token", flaky)
    params = GenerationParams(max_new_tokens=60, **GREEDY)
    streams = [engine.stream_sync(engine.request(p, params)) for p in ("One", "Two")]
    for stream in streams:
        with pytest.raises(ModelRunError, match="injected fault"):
            for _ in stream:
                pass
    assert faults == [1]
    assert wait_until(lambda: engine.stats().free_slots == 4)
    after = engine.complete_sync(engine.request("Three", GenerationParams(max_new_tokens=8,
                                                                          **GREEDY)))
    assert after.choices[0].text == greedy_text("Three", 8, **GREEDY)
    assert engine.metrics.requests.labels("error")._value.get() == 2


def test_a_full_queue_refuses_at_once(make_engine: Callable[..., Engine],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    slow_steps(monkeypatch, 0.01)
    engine = make_engine(max_batch_size=1, max_queue=1)
    params = GenerationParams(max_new_tokens=120, **GREEDY)
    running = engine.stream_sync(engine.request("A", params))
    next(running)
    queued = engine.stream_sync(engine.request("B", params))
    with pytest.raises(QueueFullError, match="at capacity"):
        engine.stream_sync(engine.request("C", params))
    assert engine.stats().waiting == 1
    queued.cancel()
    assert wait_until(lambda: engine.stats().waiting == 0)
    running.cancel()
    assert engine.metrics.requests.labels("rejected")._value.get() == 1


def test_stop_drains_then_cancels(make_engine: Callable[..., Engine],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    slow_steps(monkeypatch, 0.01)
    engine = make_engine(max_batch_size=2)
    short = engine.stream_sync(engine.request("Short", GenerationParams(max_new_tokens=5,
                                                                        **GREEDY)))
    long = engine.stream_sync(engine.request("Long", GenerationParams(max_new_tokens=120,
                                                                      **GREEDY)))
    next(long)
    engine.stop(drain_timeout=0.5)
    assert sum(len(d.token_ids) for item in short for d in item) == 5  # finished in time
    with pytest.raises(ShuttingDownError):
        for _ in long:
            pass
    with pytest.raises(ShuttingDownError):
        engine.stream_sync(engine.request("Late", GenerationParams()))


def test_standard_layout_runs_one_request_at_a_time(
        tiny_standard: Path, make_engine: Callable[..., Engine]) -> None:
    from gpt2onnx.runtime import Model

    engine = make_engine(tiny_standard, max_batch_size=4)
    assert not engine.continuous_batching
    params = GenerationParams(max_new_tokens=10, **GREEDY)
    reference = Model(tiny_standard)

    async def both() -> list:
        return await asyncio.gather(*(engine.complete(engine.request(p, params, n=2))
                                      for p in ("First", "Second")))

    for prompt, completion in zip(("First", "Second"), asyncio.run(both()), strict=True):
        expected = reference.generate(prompt, params).text
        assert [c.text for c in completion.choices] == [expected, expected]


@pytest.mark.parametrize("mixed", [False, True], ids=["separate runs", "mixed graph"])
def test_warm_up_runs_one_row_and_every_slot_then_frees_them(
        make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch,
        greedy_text: Callable[..., str], mixed: bool) -> None:
    """The warm-up sizes onnxruntime's arena for a full-batch prefill (a first burst of
    clients would otherwise pay for it) and leaves no slot or cached token behind."""
    from gpt2onnx.runtime.cache import FusedCache
    from gpt2onnx.runtime.mixed_cache import MixedFusedCache

    rows: list[int] = []
    run_many = FusedCache._run_many  # the run that puts prompts into empty slots
    run_mixed = MixedFusedCache._run  # the mixed graph's: lane 2 holds the prompts

    def spy(self: FusedCache, appends: list, *args: Any, **kwargs: Any) -> None:
        rows.append(len(appends))
        return run_many(self, appends, *args, **kwargs)

    def spy_mixed(self: MixedFusedCache, appends: list, lane: Any, group: Any,
                  *args: Any) -> None:
        if group is not None and any(len(appends[k].tokens) > 1 for k in group):
            rows.append(len(group))
        return run_mixed(self, appends, lane, group, *args)

    monkeypatch.setattr(FusedCache, "_run_many", spy)
    monkeypatch.setattr(MixedFusedCache, "_run", spy_mixed)
    engine = make_engine(max_batch_size=4, mixed_runs=mixed)
    assert engine.model.mixed is mixed
    assert rows == [1, 4]  # prefill runs of one row and of every slot, none copied
    stats = engine.stats()
    assert (stats.free_slots, stats.running, stats.waiting) == (4, 0, 0)
    request = engine.request("After the warm-up", GenerationParams(max_new_tokens=9, **GREEDY))
    assert engine.complete_sync(request).choices[0].text == greedy_text(
        "After the warm-up", 9, **GREEDY)


def test_long_lived_engine_holds_constant_memory_over_10000_requests(
        make_engine: Callable[..., Engine]) -> None:
    """The server's one generator lives as long as the server: what it (and the engine)
    keeps per request must not grow. Python allocations after 2,000 requests and after
    10,000 differ by far less than one request's worth would add up to."""
    import gc
    import tracemalloc
    from concurrent.futures import ThreadPoolExecutor

    engine = make_engine(max_batch_size=4)
    params = GenerationParams(max_new_tokens=1, **GREEDY)

    def one(i: int) -> None:
        done = engine.complete_sync(engine.request([1 + i % 50, 2, 3], params))
        assert len(done.choices[0].token_ids) == 1

    def burst(n: int) -> None:
        with ThreadPoolExecutor(4) as pool:  # 4 clients: rows join and leave the batch
            list(pool.map(one, range(n)))

    burst(2_000)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    burst(8_000)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 256 * 1024, f"{grown} bytes more after 8,000 more requests"
