"""What stays on the device: the cache is bound, reused and never copied to numpy."""

from __future__ import annotations

import numpy as np

from gpt2onnx.runtime import GenerationParams, Model
from gpt2onnx.runtime.cache import FusedCache, StandardCache


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
    cache.prefill([[1, 2, 3]])
    presents = [v.data_ptr() for v in cache.past]
    for _ in range(3):
        bound_inputs.append([])
        cache.decode(np.array([5], np.int64))
        # The OrtValues bound as past are exactly the previous step's present outputs.
        assert bound_inputs[-1] == presents
        presents = [v.data_ptr() for v in cache.past]
        assert cache.past[0].shape()[2] == 3 + len(bound_inputs) - 1


def test_fused_buffers_are_allocated_once(tiny_fused):
    model = Model(tiny_fused)
    params = GenerationParams(max_new_tokens=8, stop_on_eos=False)
    model.generate("Hello", params)
    cache = model.cache(1)
    assert isinstance(cache, FusedCache)
    addresses = [b.data_ptr() for b in cache.buffers]
    step_io = [cache.ids.ctypes.data, cache.positions.ctypes.data, cache.seqlens.ctypes.data,
               cache.logits_host.ctypes.data]
    binding = cache.decode_binding
    gen = model.generator(["Another prompt"], params)
    assert gen.cache is cache, "the same cache serves every generation of this batch size"
    while not gen.is_done():
        gen.generate_next_token()
        assert [b.data_ptr() for b in cache.buffers] == addresses
        assert cache.decode_binding is binding
    assert [cache.ids.ctypes.data, cache.positions.ctypes.data, cache.seqlens.ctypes.data,
            cache.logits_host.ctypes.data] == step_io
    # past and present are bound to one OrtValue per layer: in-place update.
    bound_out = {o.data_ptr() for o in binding.get_outputs()}
    assert set(addresses) <= bound_out
    assert cache.buffers[0].shape() == [1, 4, 128, 16]


def test_fused_cache_rows_match_the_tokens_written(tiny_fused):
    model = Model(tiny_fused)
    cache = model.cache(2)
    cache.reset()
    cache.prefill([[1, 2, 3, 4], [5, 6]])
    assert cache.lengths.tolist() == [4, 2]
    cache.decode(np.array([7, 8], np.int64))
    assert cache.lengths.tolist() == [5, 3]
    inactive = np.array([True, False])
    cache.decode(np.array([9, 0], np.int64), inactive)
    assert cache.lengths.tolist() == [6, 3]


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
    assert cache.decode_options.get_run_config_entry("gpu_graph_id") == "4"
    assert cache.prefill_options.get_run_config_entry("gpu_graph_id") == "-1"
    cache.prefill([[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]])
    shapes = [v.shape() for v in cache.decode_binding.get_outputs()]
    for _ in range(3):
        cache.decode(np.array([1, 2, 3, 4], np.int64))
        assert [v.shape() for v in cache.decode_binding.get_outputs()] == shapes
    assert cache.lengths.tolist() == [6, 4, 5, 7]


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
    binding, _ = gen.cache._prefix_bindings[1]
    assert {v.data_ptr() for v in binding.get_outputs()} >= {b.data_ptr()
                                                             for b in gen.cache.buffers}
