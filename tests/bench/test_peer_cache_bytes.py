"""The bench's KV cache column uses each engine's own cache element width, not fp32 for
everyone: llama.cpp's quantized GGUFs run with an f16 cache, OpenVINO's int8/int4 pick
theirs at load (unknown up front, so no number is made up)."""

from __future__ import annotations

import pytest

from gpt2onnx.bench.__main__ import peer_cache_bytes
from gpt2onnx.bench.variants import (
    ALL_VARIANTS,
    KIND_CT2,
    KIND_LLAMACPP,
    KIND_OPENVINO,
    KIND_OURS,
)


@pytest.mark.parametrize(("kind", "precision", "expected"), [
    (KIND_LLAMACPP, "fp32", 4), (KIND_LLAMACPP, "int8", 2), (KIND_LLAMACPP, "int4", 2),
    (KIND_OPENVINO, "fp32", 4), (KIND_OPENVINO, "int8", None), (KIND_OPENVINO, "int4", None),
    (KIND_CT2, "int8", 4),
])
def test_peer_cache_widths(kind: str, precision: str, expected: int | None) -> None:
    assert peer_cache_bytes(kind, precision) == expected


def test_every_variant_has_an_answer() -> None:
    for v in ALL_VARIANTS:
        if v.kind != KIND_OURS:  # ours read theirs from the manifest
            assert peer_cache_bytes(v.kind, v.precision) in (1, 2, 4, None), v.name
