"""What stays on the device: the cache is bound, reused and never copied to numpy."""

from __future__ import annotations

import numpy as np

from gpt2onnx.runtime import GenerationParams, Model
from gpt2onnx.runtime.cache import Append, FusedCache, StandardCache


def test_standard_present_becomes_next_past_without_copy(tiny_standard, monkeypatch):
    model = Model(tiny_standard)
    cache = model.cache(1)
    assert isinstance(cache, StandardCache)
    bound_inputs: list[list[int]] = []
    original = cache.binding.bind_ortvalue_input

    def spy(name, value):
        if name.startswith("past_key_values."):
            bound_inputs[-1].append(value.data_ptr())
        return original(name, value)

    monkeypatch.setattr(cache.binding, "bind_ortvalue_input", spy)
    bound_inputs.append([])
    cache.step([Append(0, [1, 2, 3])])
    presents = [v.data_ptr() for v in cache.past]
    for _ in range(3):
        bound_inputs.append([])
        cache.step([Append(0, [5])])
        # The OrtValues bound as past are exactly the previous step's present outputs.
        assert bound_inputs[-1] == presents
        presents = [v.data_ptr() for v in cache.past]
        assert cache.past[0].shape()[2] == 3 + len(bound_inputs) - 1


def test_fused_buffers_are_allocated_once(tiny_fused):
    model = Model(tiny_fused)
    params = GenerationParams(max_new_tokens=8, stop_on_eos=False)
    gen = model.generator(["Another prompt"], params)
    cache = gen.cache
    assert isinstance(cache, FusedCache)
    addresses = [b.data_ptr() for b in cache.buffers]
    step_io = [cache.ids.ctypes.data, cache.positions.ctypes.data, cache.seqlens.ctypes.data,
               cache.logits_host.ctypes.data]
    gen.generate_next_token()  # the prompt
    gen.generate_next_token()  # the first one-token step makes its binding
    binding, _ = cache._bindings[(0, 1)]
    while not gen.is_done():
        gen.generate_next_token()
        assert [b.data_ptr() for b in cache.buffers] == addresses
        assert cache._bindings[(0, 1)][0] is binding
    assert [cache.ids.ctypes.data, cache.positions.ctypes.data, cache.seqlens.ctypes.data,
            cache.logits_host.ctypes.data] == step_io
    # past and present are bound to one OrtValue per layer: in-place update.
    bound_out = {o.data_ptr() for o in binding.get_outputs()}
    assert set(addresses) <= bound_out
    assert cache.buffers[0].shape() == [1, 4, 128, 16]


def test_fused_cache_rows_match_the_tokens_written(tiny_fused):
    model = Model(tiny_fused)
    cache = model.cache(2)
    cache.step([Append(0, [1, 2, 3, 4]), Append(1, [5, 6])])
    assert cache.lengths.tolist() == [4, 2]
    cache.step([Append(0, [7]), Append(1, [8])])
    assert cache.lengths.tolist() == [5, 3]
    cache.step([Append(0, [9])])
    assert cache.lengths.tolist() == [6, 3]
    cache.step([Append(1, [1, 2, 3], keep=3)])  # several tokens onto a past
    assert cache.lengths.tolist() == [6, 6]
    cache.rewind(1, 4)
    assert cache.lengths.tolist() == [6, 4]


def test_continuous_batching_joins_and_leaves(tiny_fused):
    model = Model(tiny_fused)
    params = GenerationParams(max_new_tokens=10, stop_on_eos=False)
    solo = {p: model.generate(p, params).token_ids for p in ("Hello world", "Once upon", "Why")}
    gen = model.generator([], params, batch_size=2)
    a = gen.add(model.encode("Hello world"), params)
    gen.generate_next_token()
    b = gen.add(model.encode("Once upon"), params)
    for _ in range(3):
        gen.generate_next_token()
    gen.release(b)  # cancelled mid-run: the slot is free at once
    assert b in gen.free_slots
    c = gen.add(model.encode("Why"), params)
    assert c == b
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.rows[a].token_ids == solo["Hello world"]
    assert gen.rows[c].token_ids == solo["Why"]


def test_cuda_graph_options_are_static_per_batch_size(tiny_fused):
    """What can be checked without a GPU: decode steps ask for one captured graph per batch
    size, prefill runs eagerly, and decode keeps fixed shapes and bound addresses."""
    import pytest

    from gpt2onnx.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="cuda_graph=True needs provider='cuda'"):
        Model(tiny_fused, cuda_graph=True)
    model = Model(tiny_fused)
    cache = FusedCache(model.session, model.manifest, 4, model.device, cuda_graph=True)
    other = FusedCache(model.session, model.manifest, 4, model.device, cuda_graph=True)
    assert cache.eager_options.get_run_config_entry("gpu_graph_id") == "-1"
    cache.step([Append(0, [1, 2, 3]), Append(1, [4]), Append(2, [5, 6]),
                Append(3, [7, 8, 9, 10])])
    one_token = [Append(s, [s + 1]) for s in range(4)]
    cache.step(one_token)
    binding, options = cache._bindings[(0, 4)]
    graph_id = options.get_run_config_entry("gpu_graph_id")
    shapes = [v.shape() for v in binding.get_outputs()]
    for _ in range(3):
        cache.step(one_token)
        assert cache._bindings[(0, 4)][0] is binding
        assert [v.shape() for v in binding.get_outputs()] == shapes
        # Captured graphs keep the total length they saw: it is pinned at the capacity.
        assert int(cache.total) == cache.capacity
    assert cache.lengths.tolist() == [7, 5, 6, 8]
    other.step(one_token)
    assert other._bindings[(0, 4)][1].get_run_config_entry("gpu_graph_id") != graph_id, \
        "two caches (other buffer addresses) never replay one captured graph"


def test_decode_runs_only_up_to_the_last_active_slot(tiny_fused):
    """A lone row on a wide cache runs a one-row step through prefix views of the same
    buffers, and gets exactly the tokens it gets alone."""
    model = Model(tiny_fused)
    params = GenerationParams(max_new_tokens=8, stop_on_eos=False)
    alone = model.generate("Hello world", params).token_ids
    gen = model.generator([], params, batch_size=4)
    slot = gen.add(model.encode("Hello world"), params)
    assert slot == 0
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.rows[slot].token_ids == alone
    binding, _ = gen.cache._bindings[(0, 1)]
    assert {v.data_ptr() for v in binding.get_outputs()} >= {b.data_ptr()
                                                             for b in gen.cache.buffers}


def _slot_kv(cache, slot: int) -> list[np.ndarray]:
    """Every layer's whole slot (the tokens past its length included), copied."""
    return [cache.buffers[i].numpy()[slot].copy() for i in range(len(cache.names))]


def test_a_row_that_is_not_advancing_is_not_written(tiny_fused):
    """Slots 0 and 2 advance; slot 1 (paused, below the last active slot) keeps every byte
    of its cached tokens, whatever kind of run the step makes."""
    model = Model(tiny_fused)
    cache = model.cache(3)
    cache.step([Append(0, [1, 2, 3]), Append(1, [4, 5, 6, 7]), Append(2, [8, 9])])
    held = int(cache.lengths[1])
    before = [kv[:, :held] for kv in _slot_kv(cache, 1)]
    cache.step([Append(0, [10]), Append(2, [11])])  # one token each: slot 1 rides along
    cache.step([Append(2, [12, 13, 14], keep=3)])  # several onto a past
    cache.release(0)
    cache.step([Append(0, [15, 16, 17, 18, 19])])  # a new prompt in slot 0
    after = [kv[:, :held] for kv in _slot_kv(cache, 1)]
    assert cache.lengths[1] == held
    for b, a in zip(before, after, strict=True):
        assert np.array_equal(b, a)


def test_steps_match_one_prompt_run(tiny_fused):
    """Logits of a text fed as prompt + one token + a 3-token continuation equal those of
    the whole text in one run, at every position (the verb's pieces compose)."""
    model = Model(tiny_fused)
    ids = model.encode("The quick brown fox jumps over the lazy dog again")
    whole = model.cache(1).step([Append(0, ids, keep=len(ids))]).logits(0).copy()
    cache = model.cache(1)
    parts = [cache.step([Append(0, ids[:5], keep=5)]).logits(0).copy(),
             cache.step([Append(0, ids[5:6])]).logits(0).copy(),
             cache.step([Append(0, ids[6:9], keep=3)]).logits(0).copy(),
             cache.step([Append(0, ids[9:], keep=len(ids) - 9)]).logits(0).copy()]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-4)


def test_two_generators_on_one_model_do_not_share_a_cache(tiny_fused):
    model = Model(tiny_fused)
    params = GenerationParams(max_new_tokens=12, stop_on_eos=False)
    solo = {p: model.generate(p, params).token_ids for p in ("Hello world", "Once upon a")}
    a = model.generator(["Hello world"], params)
    b = model.generator(["Once upon a"], params)
    assert a.cache is not b.cache
    assert not {x.data_ptr() for x in a.cache.buffers} & {x.data_ptr() for x in b.cache.buffers}
    while not (a.is_done() and b.is_done()):
        for g in (a, b):
            if not g.is_done():
                g.generate_next_token()
    assert a.rows[0].token_ids == solo["Hello world"]
    assert b.rows[0].token_ids == solo["Once upon a"]
    # generate() inside a stream: the stream's text is unchanged.
    streamed = "".join(model.stream("Hello world", params))
    pieces = []
    for piece in model.stream("Hello world", params):
        pieces.append(piece)
        model.generate("Once upon a", params)
    assert "".join(pieces) == streamed


def test_memory_a_model_holds_is_bounded(tiny_fused):
    """Finished generators hand their caches back; the model keeps at most IDLE_CACHES."""
    import gc

    from gpt2onnx.runtime.model import IDLE_CACHES

    model = Model(tiny_fused)
    params = GenerationParams(max_new_tokens=2, stop_on_eos=False)
    for batch in range(1, 9):
        model.generate_batch(["Hi"] * batch, params)
    gc.collect()
    assert len(model._idle) <= IDLE_CACHES
    # A returned cache is reused by the next generator of its batch size.
    gen = model.generator(["Hi"] * 8, params)
    assert gen.cache.batch_size == 8 and gen.cache not in model._idle
    gen.close()
    assert model._idle[-1].batch_size == 8


def test_long_lived_generator_keeps_constant_bookkeeping(tiny_fused):
    model = Model(tiny_fused)
    params = GenerationParams(max_new_tokens=2, stop_on_eos=False)
    gen = model.generator([], params, batch_size=2)
    for _ in range(300):
        slot = gen.add(model.encode("Hi"), params)
        while not gen.is_done():
            gen.generate_next_token()
        gen.release(slot)
    assert gen.timings.decode_steps == 300
    assert not any(isinstance(v, list) for v in vars(gen.timings).values())


def test_a_second_thread_driving_one_generator_is_refused(tiny_fused):
    import threading

    import pytest

    from gpt2onnx.runtime.generator import GeneratorBusyError

    model = Model(tiny_fused)
    gen = model.generator(["Hello"], GenerationParams(max_new_tokens=50, stop_on_eos=False))
    errors: list[BaseException] = []
    entered = threading.Event()
    original = gen.cache.step

    def slow_step(appends):
        entered.set()
        import time
        time.sleep(0.3)
        return original(appends)

    gen.cache.step = slow_step  # hold the first thread inside a step
    t = threading.Thread(target=lambda: gen.generate_next_token())
    t.start()
    entered.wait(5)
    with pytest.raises(GeneratorBusyError, match="one driver at a time"):
        gen.generate_next_token()
    t.join()
    assert not errors


def test_format_1_folder_still_generates(tiny_checkpoint, tmp_path):
    """A fused folder exported before logits_index (format 1: logits [batch, vocab] at
    each row's last token) loads and generates the same tokens; asking it for more than
    the last position is a clear error."""
    import json

    import pytest

    from gpt2onnx.errors import InvalidParameterError
    from tests.runtime.format1 import write_format1_folder

    folder = write_format1_folder(tiny_checkpoint, tmp_path / "v1")
    assert json.loads((folder / "manifest.json").read_text())["format_version"] == 1
    old = Model(folder)
    assert not old.manifest.any_logits
    params = GenerationParams(max_new_tokens=10, stop_on_eos=False)
    reference = Model(folder.parent / "v2").generate_batch(["Hello world", "Hi"], params)
    got = old.generate_batch(["Hello world", "Hi"], params)
    assert [r.token_ids for r in got] == [r.token_ids for r in reference]
    with pytest.raises(InvalidParameterError, match="re-export"):
        old.score("Hello world")
    with pytest.raises(InvalidParameterError, match="re-export"):
        old.generate("Hello", params.with_(prompt_logprobs=1))


def test_threads_on_one_model_each_get_their_solo_tokens(tiny_fused):
    """One Model, several threads, a generator each: no generation is disturbed."""
    from concurrent.futures import ThreadPoolExecutor

    model = Model(tiny_fused)
    prompts = ["Hello world", "Once upon a time", "The module", "Why is", "A B C"] * 4
    params = GenerationParams(max_new_tokens=12, stop_on_eos=False)
    solo = {p: Model(tiny_fused).generate(p, params).token_ids for p in set(prompts)}
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: model.generate(p, params).token_ids, prompts))
    assert got == [solo[p] for p in prompts]


def test_step_refuses_bad_appends_with_typed_errors(tiny_fused):
    import pytest

    from gpt2onnx.errors import InvalidParameterError, PromptTooLongError

    cache = Model(tiny_fused).cache(2)
    cases = [([], "at least one Append"),
             ([Append(2, [1])], "slot 2 is outside"),
             ([Append(0, [1]), Append(0, [2])], "appears twice"),
             ([Append(0, [])], "has no tokens"),
             ([Append(0, [1, 2], keep=3)], "keep must be an integer in \\[0, 2\\]"),
             ([Append(0, [1, 2], keep=1.5)], "keep must be an integer"),
             ([Append(0, [1, 99999])], "token id 99999 is outside the vocabulary"),
             ([Append(0, [-1])], "token id -1 is outside the vocabulary")]
    for appends, match in cases:
        with pytest.raises(InvalidParameterError, match=match):
            cache.step(appends)
    with pytest.raises(PromptTooLongError, match="capacity of 128"):
        cache.step([Append(0, list(range(129)))])
    assert cache.lengths.tolist() == [0, 0]  # nothing of a refused step happened
    with pytest.raises(InvalidParameterError, match="rewind to a length in \\[0, 0\\]"):
        cache.rewind(0, 3)


def test_a_scoring_row_beside_prompts_runs_alone(tiny_fused):
    """A prompt asking for every position's logits does not make its neighbours' run
    return that many positions, and every row gets the logits it gets alone."""
    model = Model(tiny_fused)
    a, b, c = [1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]
    res = model.cache(3).step([Append(0, a, keep=6), Append(1, b), Append(2, c)])
    assert res.logits(0).shape[0] == 6 and res.logits(1).shape[0] == 1
    for slot_ids, k in ((a, 0), (b, 1), (c, 2)):
        alone = model.cache(1).step([Append(0, slot_ids, keep=len(slot_ids))]).logits(0)
        np.testing.assert_allclose(res.logits(k), alone[-res.logits(k).shape[0]:], atol=1e-5)


def test_min_tokens_holds_back_stop_strings_like_vllm(tiny_fused):
    model = Model(tiny_fused)
    base = GenerationParams(max_new_tokens=8, stop_on_eos=False)
    free = model.generate("Hello", base)
    stop = model.decode(free.token_ids[:1])
    assert stop and free.text.startswith(stop)
    first_stops = model.generate("Hello", base.with_(stop=(stop,)))
    assert first_stops.token_ids == free.token_ids[:1] and first_stops.text == ""
    # min_tokens=1: the first token may complete a stop string (vLLM checks once the
    # output is min_tokens long); min_tokens=2: it may not.
    assert model.generate("Hello", base.with_(stop=(stop,), min_tokens=1)).token_ids == \
        free.token_ids[:1]
    held = model.generate("Hello", base.with_(stop=(stop,), min_tokens=2))
    assert len(held.token_ids) >= 2


def test_min_tokens_greedy_equals_transformers_when_eos_is_the_argmax(
        tiny_checkpoint, tiny_fused, tmp_path, monkeypatch):
    """A greedy row held off EOS by min_tokens takes the device's argmax unless it is EOS.
    With EOS made the token greedy picks first, that step needs the masked logits, the
    later ones do not, and every token must still be transformers' min_new_tokens output."""
    import json
    import shutil

    import pytest

    from gpt2onnx.runtime import generator

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    prompt = [12, 400, 6, 81]
    eos = Model(tiny_fused).generate(prompt, GenerationParams(
        max_new_tokens=1, stop_on_eos=False)).token_ids[0]
    folder = tmp_path / "eos"
    shutil.copytree(tiny_fused, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["eos_token_id"] = eos
    (folder / "manifest.json").write_text(json.dumps(manifest))
    ref = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    model = Model(folder)
    processed = []  # rows that went through the sampler's logits path

    def counted(logits, samplers, *args):
        processed.append(len(samplers))
        return pick_tokens(logits, samplers, *args)

    pick_tokens = generator.pick_tokens
    monkeypatch.setattr(generator, "pick_tokens", counted)
    for rows in (1, 3):
        for min_tokens in (8, 3):
            params = GenerationParams(max_new_tokens=8, min_tokens=min_tokens)
            with torch.no_grad():
                want = ref.generate(torch.tensor([prompt]), max_new_tokens=8,
                                    min_new_tokens=min_tokens, do_sample=False,
                                    eos_token_id=eos, pad_token_id=eos)[0, len(prompt):]
            want_ids = want.tolist()
            if eos in want_ids:  # transformers pads after EOS; we stop at it
                want_ids = want_ids[:want_ids.index(eos) + 1]
            processed.clear()
            got = model.generate_batch([prompt] * rows, params)
            assert all(r.token_ids == want_ids for r in got), (min_tokens, want_ids)
            assert want_ids[0] != eos and 0 < sum(processed) < rows * min(min_tokens, 8)
