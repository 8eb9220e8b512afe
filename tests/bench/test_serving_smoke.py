"""`python -m gpt2onnx.bench.serving --smoke` end to end on a tiny model: real servers,
every workload, no failed request, and the prefix cache answering the shared-prefix
workload from stored blocks."""

from __future__ import annotations

import pytest

from tests.bench.helpers import run_smoke


def test_serving_bench_smoke(tmp_path) -> None:
    pytest.importorskip("torch")
    r = run_smoke("gpt2onnx.bench.serving", tmp_path, "serving.json")
    (distinct,) = r["distinct"]["this engine"]
    assert distinct["failed"] == 0 and distinct["completed"] == r["requests"]
    assert distinct["ttft_ms"]["median"] > 0 and distinct["output_tok_s"] > 0
    for variant in ("prefix cache on", "prefix cache off"):
        (row,) = r["shared_prefix"][variant]
        assert row["failed"] == 0, (variant, row["errors"])
    (long,) = r["long_prompt"]["this engine"]
    assert long["long_ok"] and long["rows_ok"] == 15
    text = (tmp_path / "results" / "serving.md").read_text()
    assert "| prefix cache on |" in text and "A 900-token prompt" in text
