"""The KV-cache formula against hand computations for the gpt2 family."""

from __future__ import annotations

from gpt2onnx.kvmem import GPT2_FAMILY, arch_bytes, human, kv_cache_bytes, main


def test_gpt2_fp32_batch1_full_context() -> None:
    # 2 (K and V) x 12 layers x batch 1 x 12 heads x 64 head_dim x 1024 tokens x 4 bytes
    assert kv_cache_bytes(12, 12, 64, 1, 1024, 4) == 2 * 12 * 1 * 12 * 64 * 1024 * 4
    assert arch_bytes(GPT2_FAMILY["gpt2"], 1, 1024, "fp32") == 75_497_472
    assert human(75_497_472) == "72.0 MiB"


def test_scales_linearly_and_halves_in_fp16() -> None:
    xl = GPT2_FAMILY["gpt2-xl"]  # 48 layers, 25 heads of 64
    assert arch_bytes(xl, 32, 1024, "fp32") == 2 * 48 * 32 * 25 * 64 * 1024 * 4
    assert arch_bytes(xl, 32, 1024, "fp16") * 2 == arch_bytes(xl, 32, 1024, "fp32")
    assert arch_bytes(xl, 8, 512, "fp32") * 8 == arch_bytes(xl, 32, 1024, "fp32")


def test_cli_prints_a_table(capsys) -> None:
    assert main(["--model", "gpt2", "--batch", "1", "--seq", "1024", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "| gpt2 | fp32 | 1 | 72.0 MiB |" in out
