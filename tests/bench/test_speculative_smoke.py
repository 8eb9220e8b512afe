"""`python -m gpt2onnx.bench.speculative --smoke` end to end on tiny models: every
workload runs, and greedy speculation reproduces plain decoding in each."""

from __future__ import annotations

import pytest

from tests.bench.helpers import run_smoke


def test_speculative_bench_smoke(tmp_path) -> None:
    pytest.importorskip("torch")
    r = run_smoke("gpt2onnx.bench.speculative", tmp_path, "speculative.json")
    names = [w["workload"] for w in r["workloads"]]
    assert "gpt2 arch, greedy" in names and "gpt2 arch, greedy, batch 4" in names
    for w in r["workloads"]:
        assert w["rows"][0]["variant"] == "plain"
        for row in w["rows"]:
            assert row["ms_per_token"] > 0
            if w["greedy"]:
                assert row["identical"], (w["workload"], row["variant"])
        if "nothing to copy" not in w["workload"]:  # there prompt lookup rarely finds any
            assert any(row["tokens_per_round"] > 0 for row in w["rows"][1:]), w["workload"]
    assert "| prompt lookup k=4 |" in (tmp_path / "results" / "speculative.md").read_text()
