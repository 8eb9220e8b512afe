"""`python -m gpt2onnx.bench --smoke` end to end on a tiny model: the bench can't rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("psutil")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "gpt2onnx.bench", "--smoke", "--out", str(out / "results"),
           "--cache", str(out / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| variant |" in proc.stdout  # the table goes to stdout too
    return out / "results"


def test_json_has_every_measurement(smoke: Path) -> None:
    r = json.loads((smoke / "latest.json").read_text())
    for key in ("meta", "config", "variants", "decode", "positions", "batch", "cold", "floor",
                "targets", "kvmem", "agree_with_torch"):
        assert key in r, key
    assert r["meta"]["physical_cores"] >= 1 and r["meta"]["onnxruntime"] and r["meta"]["torch"]
    expected = {"torch-uncached", "torch-cached", "hf-generate", "ours-standard-fp32",
                "ours-fused-fp32", "ours-fused-int8", "ours-fused-int4",
                "ours-fused-int4-b128"}
    assert expected <= set(r["decode"])
    assert "optimum" not in r["decode"]  # smoke mode needs no extra venv
    for name in expected:
        d = r["decode"][name]
        assert d["ms_per_token"] > 0 and d["ms_per_token_p90"] >= d["ms_per_token"] * 0.5
        assert set(r["positions"][name]) == {"16", "64", "100"}
    for name in expected - {"torch-uncached"}:
        assert set(r["batch"][name]) == {"1", "4"}
        assert r["cold"][name]["first_token_s"] > 0 and r["cold"][name]["peak_rss_mb"] > 10
    assert set(r["floor"]) == {"fp32", "int8", "int4"}
    assert all(f["gemv_ms"] > 0 and f["weight_bytes"] > 0 for f in r["floor"].values())
    # The paired fused/standard comparison (issue 4): every position, every pair.
    layouts = r["layouts"]
    assert set(layouts) == {"16", "100"}
    for v in layouts.values():
        assert v["pairs"] == 2 and 0 <= v["fused_faster_pairs"] <= 2
        assert v["ratio_min"] <= v["ratio_median"] <= v["ratio_max"]
        assert v["fused_ms"] > 0 and v["standard_ms"] > 0
    issue4 = [t for t in r["targets"] if t["issue"] == 4 and "paired" in t["what"]]
    assert len(issue4) == 1 and issue4[0]["value"] == max(
        v["ratio_median"] for v in layouts.values())  # no position past 256 in smoke
    # fp32 graphs compute the PyTorch model: greedy tokens agree from the first one.
    assert r["agree_with_torch"]["ours-fused-fp32"] >= 1
    # Sampled decode (the engines that sample) and the long prefill (every cached one).
    assert {"hf-generate", "ours-fused-fp32", "ours-fused-int8"} <= set(r["decode_sampled"])
    assert "torch-cached" not in r["decode_sampled"]  # its greedy loop does not sample
    for name, d in r["decode_sampled"].items():
        assert d["ms_per_token"] > 0, name
        assert len(d["runs"][0]["tokens"]) == r["config"]["new_tokens"], name
    assert set(r["prefill_long"]) == expected - {"torch-uncached"}
    for name, d in r["prefill_long"].items():
        assert d["tokens"] == r["config"]["prefill_tokens"] and d["prefill_ms"] > 0, name
    assert r["meta"]["cpu_flags"] is not None


def test_markdown_and_plots(smoke: Path) -> None:
    md = (smoke / "latest.md").read_text()
    for heading in ("ms/token (median)", "Per-token latency", "Fused against standard fp32, paired",
                    "tokens/s (all rows)", "Batch-1 decode sampled",
                    "Cold start", "Weight-streaming floor", "Targets", "KV cache memory"):
        assert heading in md, heading
    for png in ("latency_vs_position.png", "tokens_per_s_vs_batch.png",
                "ms_per_token_vs_floor.png", "engines_by_measure.png"):
        data = (smoke / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
