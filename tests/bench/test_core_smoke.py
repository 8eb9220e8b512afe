"""`python -m gpt2onnx.bench.core --smoke` end to end on a tiny model: sampled vs greedy
rows and the scoring comparison stay runnable, and their numbers are sane."""

from __future__ import annotations

import pytest

from tests.bench.helpers import run_smoke


def test_core_bench_smoke(tmp_path) -> None:
    pytest.importorskip("torch")
    r = run_smoke("gpt2onnx.bench.core", tmp_path, "core.json")
    cells = {(s["precision"], s["batch"]) for s in r["sampling"]}
    assert cells == {("fp32", 1), ("fp32", 16), ("int8", 1), ("int8", 16)}
    for s in r["sampling"]:
        assert s["greedy_ms"] > 0 and s["sampled_ms"] > 0
    score = r["scoring"]
    assert score["perplexity_rel_diff"] < 1e-4  # fp32: the same perplexity as transformers
    assert score["ours_tok_s"] > 0 and score["transformers_tok_s"] > 0
    assert "| fused int8 | 16 |" in (tmp_path / "results" / "core.md").read_text()
