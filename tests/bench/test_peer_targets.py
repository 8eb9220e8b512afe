"""Issue 17's targets: ours against the best peer of each precision, int4 at both blocks."""

from __future__ import annotations

from gpt2onnx.bench.report import peer_targets


def _results() -> dict:
    variants = {
        "ours-fused-int4": {"kind": "ours", "precision": "int4"},
        "ours-fused-int4-b128": {"kind": "ours", "precision": "int4"},
        "llamacpp-q4_0": {"kind": "llamacpp", "precision": "int4"},
        "openvino-int4": {"kind": "openvino", "precision": "int4"},
        "optimum": {"kind": "optimum", "precision": "fp32"},  # not a peer
    }
    ms = {"ours-fused-int4": 5.0, "ours-fused-int4-b128": 4.0, "llamacpp-q4_0": 4.4,
          "openvino-int4": 4.6}
    return {
        "variants": variants,
        "decode": {n: {"ms_per_token": v} for n, v in ms.items()},
        "batch": {"ours-fused-int4": {"16": 600.0}, "ours-fused-int4-b128": {"16": 700.0},
                  "openvino-int4": {"16": 1000.0}, "llamacpp-q4_0": {"16": 800.0}},
        "cold": {n: {"first_token_s": 0.5, "peak_rss_mb": 200.0} for n in ms},
        "prefill_long": {"ours-fused-int4": {"prefill_ms": 600.0},
                         "ours-fused-int4-b128": {"prefill_ms": 500.0},
                         "openvino-int4": {"prefill_ms": 250.0}},
    }


def test_int4_targets_for_the_default_and_the_coarse_block():
    got = {t.what: t for t in peer_targets(_results())}
    default = got["int4 batch-1 greedy tokens/s, ours / the best peer's"]
    coarse = got["int4 (ours at block 128) batch-1 greedy tokens/s, ours / the best peer's"]
    # The best peer is the fastest one (llama.cpp 4.4 ms), for both of ours.
    assert default.detail == coarse.detail == "llamacpp-q4_0"
    assert abs(default.value - 4.4 / 5.0) < 1e-9 and not default.met
    assert abs(coarse.value - 4.4 / 4.0) < 1e-9 and not coarse.met  # 1.10 < 1.15
    b16 = got["int4 (ours at block 128) batch-16 tokens/s, ours / the best peer's"]
    assert b16.detail == "openvino-int4" and abs(b16.value - 0.7) < 1e-9
    prefill = got["int4 (ours at block 128) prefill time, ours / the best peer's"]
    assert abs(prefill.value - 2.0) < 1e-9 and prefill.op == "<="
    assert not any("fp32" in w for w in got)  # no fp32 peer in these results


def test_a_missing_coarse_variant_gives_no_rows():
    r = _results()
    del r["variants"]["ours-fused-int4-b128"]
    assert not [t for t in peer_targets(r) if "block 128" in t.what]
