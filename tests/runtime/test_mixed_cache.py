"""The mixed graph: one-token rows and a prompt chunk in one model run give the same
logits and the same cache as the plain fused graph's separate runs, in fewer runs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gpt2onnx.errors import InvalidParameterError, ModelFolderError
from gpt2onnx.runtime import GenerationParams, Model
from gpt2onnx.runtime.cache import Append, FusedCache
from gpt2onnx.runtime.mixed_cache import MixedFusedCache

SLOTS = 6


@pytest.fixture(scope="module")
def pair(tiny_fused: Path) -> tuple[Model, Model]:
    return Model(tiny_fused), Model(tiny_fused, mixed=True)


def _ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


def _same(plain: FusedCache, mixed: MixedFusedCache, appends: list[Append]) -> None:
    """One step on both caches: equal logits, argmax, lengths and cached tokens."""
    want = plain.step(appends)
    got = mixed.step(appends)
    for k, a in enumerate(appends):
        if a.keep:
            np.testing.assert_allclose(got.logits(k), want.logits(k), atol=1e-4, rtol=1e-4)
            assert got.argmax(k).tolist() == want.argmax(k).tolist()
    assert mixed.lengths.tolist() == plain.lengths.tolist()
    for j in range(len(plain.names)):
        for slot in range(plain.batch_size):
            np.testing.assert_allclose(mixed.row_kv(j, slot), plain.row_kv(j, slot),
                                       atol=1e-5)


def test_a_step_of_decode_rows_and_a_chunk_is_one_run_and_equals_separate_runs(
        pair: tuple[Model, Model]) -> None:
    plain_model, mixed_model = pair
    plain, mixed = plain_model.cache(SLOTS), mixed_model.cache(SLOTS)
    assert isinstance(mixed, MixedFusedCache) and not isinstance(plain, MixedFusedCache)
    vocab = plain_model.manifest.vocab_size
    rng = np.random.default_rng(0)
    # Two prompts into adjacent empty slots: one right-padded run, lane 1 a dummy.
    _same(plain, mixed, [Append(0, _ids(rng, 7, vocab)), Append(1, _ids(rng, 4, vocab))])
    assert mixed.runs == 1
    # Rows 0 and 1 decode while slot 2 takes a first chunk and then a second one.
    _same(plain, mixed, [Append(0, _ids(rng, 1, vocab)), Append(1, _ids(rng, 1, vocab)),
                         Append(2, _ids(rng, 5, vocab), keep=0)])
    assert mixed.runs == 2
    _same(plain, mixed, [Append(0, _ids(rng, 1, vocab)), Append(1, _ids(rng, 1, vocab)),
                         Append(2, _ids(rng, 6, vocab))])
    assert mixed.runs == 3
    # A chunk onto a slot *inside* lane 1's range (slot 3 decodes around it), with
    # logits at every position (scoring): lane 1's dummy token for slot 2 lands past it.
    _same(plain, mixed, [Append(3, _ids(rng, 3, vocab))])
    _same(plain, mixed, [Append(1, _ids(rng, 1, vocab)), Append(3, _ids(rng, 1, vocab)),
                         Append(2, _ids(rng, 4, vocab), keep=4)])
    # Decode rows only: the highest slot takes lane 2, still one run.
    before = mixed.runs
    _same(plain, mixed, [Append(s, _ids(rng, 1, vocab)) for s in (0, 1, 2, 3)])
    assert mixed.runs == before + 1
    # One row alone (lane 1 a dummy), and two chunks in one step (two runs).
    _same(plain, mixed, [Append(2, _ids(rng, 1, vocab))])
    before = mixed.runs
    _same(plain, mixed, [Append(0, _ids(rng, 1, vocab)), Append(4, _ids(rng, 3, vocab)),
                         Append(2, _ids(rng, 3, vocab))])
    assert mixed.runs == before + 2


def test_a_chunk_that_fills_its_slot_inside_lane_one_runs_apart(pair: tuple[Model, Model]
                                                                ) -> None:
    plain_model, mixed_model = pair
    plain, mixed = plain_model.cache(3), mixed_model.cache(3)
    vocab, capacity = plain_model.manifest.vocab_size, plain.capacity
    rng = np.random.default_rng(1)
    _same(plain, mixed, [Append(0, _ids(rng, 3, vocab)), Append(1, _ids(rng, 5, vocab)),
                         Append(2, _ids(rng, 3, vocab))])
    # Slot 1 fills to the capacity, between decoding slots 0 and 2: no room for lane 1's
    # dummy token past it, so the lanes run apart, with the same results.
    before = mixed.runs
    _same(plain, mixed, [Append(0, _ids(rng, 1, vocab)), Append(2, _ids(rng, 1, vocab)),
                         Append(1, _ids(rng, capacity - 5, vocab))])
    assert mixed.runs == before + 2
    assert mixed.lengths[1] == capacity


def test_generation_through_the_mixed_graph_equals_the_plain_graph(
        pair: tuple[Model, Model]) -> None:
    plain, mixed = pair
    assert mixed.mixed and not plain.mixed
    prompts = ["hello there", "a", "the quick brown fox jumps over", "x y z"]
    for params in (GenerationParams(max_new_tokens=12, temperature=0.0, stop_on_eos=False),
                   GenerationParams(max_new_tokens=12, temperature=0.9, seed=3,
                                    stop_on_eos=False)):
        want = [r.token_ids for r in plain.generate_batch(prompts, params)]
        assert [r.token_ids for r in mixed.generate_batch(prompts, params)] == want
    text = "the quick brown fox jumps over the lazy dog " * 3
    want_score, got_score = plain.score(text), mixed.score(text)
    assert got_score.token_ids == want_score.token_ids
    np.testing.assert_allclose(got_score.logprobs[1:], want_score.logprobs[1:], atol=1e-4)


def test_prefill_and_decode_is_prefill_then_a_step_in_one_run(pair: tuple[Model, Model]
                                                              ) -> None:
    plain = pair[0]
    params = GenerationParams(max_new_tokens=6, temperature=0.0, stop_on_eos=False)
    long_ids = plain.encode("a longer prompt that enters the cache in two chunks here")
    results = []
    for model in pair:
        gen = model.generator([], batch_size=3)
        first = gen.reserve(plain.encode("Hi"), params)
        gen.prefill([(first, 8)])
        second = gen.reserve(long_ids, params)
        rows = [gen.rows[first], gen.rows[second]]
        runs = getattr(gen.cache, "runs", None)
        done, picked = gen.prefill_and_decode([(second, 5)])
        assert done == [] and picked[first] >= 0
        if runs is not None:
            assert gen.cache.runs == runs + 1  # one model run for both
        done, _ = gen.prefill_and_decode([(second, len(long_ids) - 5)])
        assert done == [second]
        while not gen.is_done():
            gen.generate_next_token()
        results.append([r.token_ids for r in rows])
        gen.close()
    assert results[0] == results[1]
    assert all(len(ids) == 6 for ids in results[0])


def test_a_folder_without_a_mixed_graph_loads_plain(tiny_fused: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_fused, old)
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["mixed_graph_file"] == "model_mixed.onnx"
    manifest["mixed_graph_file"] = None
    del manifest["files"]["model_mixed.onnx"]
    (old / "model_mixed.onnx").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    model = Model(old, mixed=True)
    assert not model.mixed and isinstance(model.cache(2), FusedCache)
    assert model.generate("hello", max_new_tokens=3).token_ids


def test_a_mixed_graph_path_out_of_the_folder_is_refused(tiny_fused: Path, tmp_path: Path
                                                         ) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_fused, bad)
    shutil.copy(bad / "model_mixed.onnx", tmp_path / "elsewhere.onnx")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["mixed_graph_file"] = "../elsewhere.onnx"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="mixed_graph_file"):
        Model(bad, mixed=True)


def test_a_mixed_load_of_a_folder_without_one_is_a_typed_error(tiny_fused: Path) -> None:
    from dataclasses import replace

    from gpt2onnx.runtime.folder import make_session, open_manifest

    manifest = replace(open_manifest(tiny_fused), mixed_graph_file=None)
    with pytest.raises(InvalidParameterError, match="CPU fused folder with a mixed graph"):
        make_session(tiny_fused, manifest, "cpu", mixed=True)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_mixed_graphs_equal_their_plain_graph(
        tiny_checkpoint: Path, export_folder: Callable[..., Path], precision: str) -> None:
    """Dynamic int8 quantizes activations over the whole token axis: the column layout
    must not change what a run computes for the rows of either lane."""
    folder = export_folder(tiny_checkpoint, layout="fused", precision=precision)
    plain, mixed = Model(folder).cache(4), Model(folder, mixed=True).cache(4)
    assert isinstance(mixed, MixedFusedCache)
    vocab = plain.vocab
    rng = np.random.default_rng(2)
    _same(plain, mixed, [Append(0, _ids(rng, 6, vocab)), Append(1, _ids(rng, 3, vocab))])
    _same(plain, mixed, [Append(0, _ids(rng, 1, vocab)), Append(1, _ids(rng, 1, vocab)),
                         Append(2, _ids(rng, 5, vocab))])
    _same(plain, mixed, [Append(s, _ids(rng, 1, vocab)) for s in (0, 1, 2)])


def test_the_mixed_graph_splits_each_layer_once_and_reshapes_only_lane_two(
        tiny_fused: Path) -> None:
    """The serving loop's usual step runs lane 2 with one decode row, so every node the
    lanes add is paid on every step (docs/serving.md): one Split per layer, and Reshapes
    for lane 2 alone (into and out of its [chunk rows, width] shape)."""
    import onnx

    manifest = json.loads((tiny_fused / "manifest.json").read_text())
    fused = onnx.load(tiny_fused / manifest["graph_file"], load_external_data=False)
    mixed = onnx.load(tiny_fused / manifest["mixed_graph_file"], load_external_data=False)

    def count(graph: onnx.ModelProto, op: str) -> int:
        return sum(n.op_type == op for n in graph.graph.node)

    layers = manifest["n_layer"]
    assert count(mixed, "GroupQueryAttention") == 2 * layers
    assert count(mixed, "Split") == layers and count(mixed, "Slice") == count(fused, "Slice")
    # Two per layer for lane 2, the ids and positions into a column, the hidden state back.
    assert count(mixed, "Reshape") == count(fused, "Reshape") + 2 * layers + 3
    # Per layer: Split, lane 2's GroupQueryAttention, two Reshapes, Concat; once: the lane
    # sizes (three Shapes, a Sub, two Concats) and the three Reshapes above.
    added = len(mixed.graph.node) - len(fused.graph.node)
    assert added - sum(n.op_type == "Constant" for n in mixed.graph.node) == 5 * layers + 9
