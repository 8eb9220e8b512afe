"""Prometheus metrics of one engine, in a registry of their own (several engines, e.g. in
tests, never collide in the global one)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

OUTCOMES = ("success", "bad_request", "unauthorized", "too_large", "rejected", "cancelled",
            "timeout", "error", "unavailable")
# Seconds; a tiny model on a CPU answers in milliseconds, gpt2 on a busy CPU in seconds.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STEP_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class ServeMetrics:
    """Requests by outcome, tokens in and out, queue depth, running batch size, and the
    latency histograms ``vllm bench serve`` reports (TTFT, TPOT)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("gpt2onnx_requests", "Completion requests by outcome",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # export every outcome from the start, at 0
        self.prompt_tokens = Counter("gpt2onnx_prompt_tokens",
                                     "Prompt tokens prefilled (once per choice)", registry=r)
        self.generation_tokens = Counter("gpt2onnx_generation_tokens",
                                         "Tokens generated", registry=r)
        self.queue_depth = Gauge("gpt2onnx_queue_depth",
                                 "Rows (choices) waiting for a cache slot", registry=r)
        self.running_batch_size = Gauge("gpt2onnx_running_batch_size",
                                        "Rows in the running batch", registry=r)
        self.time_to_first_token = Histogram(
            "gpt2onnx_time_to_first_token_seconds", "From submission to the first token",
            buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "gpt2onnx_time_per_output_token_seconds",
            "Mean time between a row's tokens after the first", buckets=TPOT_BUCKETS,
            registry=r)

        # Speculative decoding (--speculative): acceptance rate = accepted / draft tokens;
        # tokens per verification = emitted / verifications.
        self.spec_verifications = Counter(
            "gpt2onnx_spec_verifications", "Rows verified with a draft (one per row and step)",
            registry=r)
        self.spec_draft_tokens = Counter("gpt2onnx_spec_draft_tokens",
                                         "Draft tokens checked by the model", registry=r)
        self.spec_accepted_tokens = Counter("gpt2onnx_spec_accepted_tokens",
                                            "Draft tokens the model agreed with", registry=r)
        self.spec_emitted_tokens = Counter(
            "gpt2onnx_spec_emitted_tokens",
            "Tokens produced by verifications (accepted drafts plus the model's own)",
            registry=r)

        # The scheduler: prompt chunks, each step's tokens against its budget, and prefix
        # caching (hit rate = hit tokens / queried tokens; hit tokens were not prefilled).
        self.prefill_chunks = Counter("gpt2onnx_prefill_chunks",
                                      "Prompt chunks run (one per row and step)", registry=r)
        self.mixed_runs = Counter("gpt2onnx_mixed_runs",
                                  "Steps whose prompt chunks and decode tokens shared one "
                                  "model run (the mixed graph)", registry=r)
        self.step_tokens = Histogram("gpt2onnx_step_tokens",
                                     "Tokens a step with prompt chunks ran (prompt + decode)",
                                     buckets=STEP_TOKEN_BUCKETS, registry=r)
        self.step_budget_used = Histogram(
            "gpt2onnx_step_budget_used", "Share of the step's token budget used, for steps "
            "with prompt chunks", buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.prefix_queried_tokens = Counter(
            "gpt2onnx_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix "
            "cache", registry=r)
        self.prefix_hit_tokens = Counter(
            "gpt2onnx_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix "
            "cache (prefill saved)", registry=r)
        self.prefix_cache_bytes = Gauge("gpt2onnx_prefix_cache_bytes",
                                        "Host memory held by stored prompt blocks", registry=r)

    def outcome(self, name: str) -> None:
        self.requests.labels(name).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
