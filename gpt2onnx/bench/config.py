"""What one bench run measures: the full preset (gpt2, 124M) and the CI smoke preset."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# nanoGPT-style presets of GPT2Config fields.
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)  # 124M
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of every measurement; one instance per run, recorded in the JSON.

    Args:
        arch: GPT2Config fields of the random-weight checkpoint (when no real one is given).
        prompt_tokens: prompt length of the decode, batch and cold-start measurements.
        new_tokens: tokens generated per timed decode run (batch 1).
        runs: timed decode runs per variant after one warm-up, interleaved.
        uncached_runs: the same for the (slow) uncached PyTorch loop.
        positions: context lengths at which per-token latency is reported.
        position_window: decode steps around each position whose median is reported.
        position_runs: passes over the position curve (interleaved); medians across them.
        layout_positions: context lengths of the paired fused/standard fp32 comparison
            (issue 4): each pair runs back to back, so both see the same machine state.
        layout_window: decode steps timed per pair member (after a prefill of the position).
        layout_runs: pairs per position; the order inside a pair alternates.
        batches: batch sizes of the throughput measurement.
        batch_new_tokens: tokens generated per row in the throughput measurement.
        batch_runs: passes over the batch sizes (interleaved).
        cold_runs: fresh processes per variant for cold start and peak RSS.
        cold_new_tokens: tokens a cold-start process generates before it reports peak RSS.
        floor_runs: timed GEMV runs per precision.
        sampled_runs: timed batch-1 decode runs sampling (``SAMPLING``) per variant whose
            engine samples; 0 skips them.
        prefill_tokens: prompt length of the long-prefill measurement (0 skips it).
        prefill_runs: timed long prefills per variant.
    """

    name: str
    arch: dict[str, int] = field(default_factory=lambda: dict(GPT2))
    prompt_tokens: int = 8
    new_tokens: int = 128
    runs: int = 5
    uncached_runs: int = 3
    positions: tuple[int, ...] = (16, 32, 64, 128, 256, 384, 512, 768, 1000)
    position_window: int = 8
    position_runs: int = 2
    layout_positions: tuple[int, ...] = (16, 128, 256, 384, 512, 768, 1000)
    layout_window: int = 16
    layout_runs: int = 7
    batches: tuple[int, ...] = (1, 4, 16, 32)
    batch_new_tokens: int = 32
    batch_runs: int = 2
    cold_runs: int = 2
    cold_new_tokens: int = 16
    floor_runs: int = 30
    sampled_runs: int = 3
    prefill_tokens: int = 512
    prefill_runs: int = 3

    def with_(self, **changes: object) -> BenchConfig:
        return replace(self, **changes)


FULL = BenchConfig(name="full")
# Small enough for CI (the whole smoke run, exports included, in well under a minute).
SMOKE = BenchConfig(
    name="smoke", arch=dict(TINY), prompt_tokens=8, new_tokens=8, runs=2, uncached_runs=1,
    positions=(16, 64, 100), position_window=4, position_runs=1, layout_positions=(16, 100),
    layout_window=4, layout_runs=2, batches=(1, 4),
    batch_new_tokens=4, batch_runs=1, cold_runs=1, cold_new_tokens=2, floor_runs=3,
    sampled_runs=1, prefill_tokens=64, prefill_runs=1)
# Every engine at its own best, in less time than FULL: what `make bench-peers` runs into
# bench/results/peers (no fused/standard pairs; three context positions; batch 1 and 16).
PEERS = FULL.with_(name="peers", runs=3, positions=(16, 256, 1000), position_runs=1,
                   layout_positions=(), batches=(1, 16), batch_runs=2, cold_runs=2)
# What "sampled" means in every engine: the settings a chat or completion user runs.
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "seed": 0}
