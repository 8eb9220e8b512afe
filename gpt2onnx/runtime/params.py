"""Generation parameters, validated once, with messages that name the value and the range."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from gpt2onnx.errors import InvalidParameterError

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # top alternatives reported per token (vLLM's default cap)
MAX_DRAFT_TOKENS = 16  # draft tokens verified per step at most
OVERFLOW_MODES = ("error", "truncate")
# logits / temperature must stay finite in float32 (max ~3.4e38): with |logit| up to ~1e3 a
# temperature of 1e-4 gives 1e7, far from overflow, while 1e-36 gives inf (and inf - inf = nan
# in the softmax). Anything that small is greedy in effect; temperature 0 says so exactly.
MIN_TEMPERATURE = 1e-4
# Above this every token is equally likely in effect (a real model's logits span tens, so
# logits / 1e4 differ by < 0.01); the cap keeps the value far inside float32 (a 1e39 would
# become inf there, and logits / inf = 0 or NaN).
MAX_TEMPERATURE = 1e4
# top_k is compared with the vocabulary as a numpy integer; int32's largest value is far above
# any vocabulary and keeps a JSON 1e30 from overflowing that conversion.
MAX_TOP_K = 2**31 - 1
# onnxruntime intra-op threads. More threads than cores only adds contention, and onnxruntime
# creates every one up front: 100000 hangs while memory grows. No machine it serves on has
# more logical cores than this.
MAX_THREADS = 512
# CTRL's paper suggests ~1.2; outside [0.01, 100] a penalty only wipes the logits out.
REPETITION_PENALTY_RANGE = (1e-2, 100.0)
# OpenAI's documented range for frequency_penalty and presence_penalty.
PENALTY_RANGE = (-2.0, 2.0)


@dataclass(frozen=True)
class GenerationParams:
    """How to pick tokens and when to stop.

    Args:
        max_new_tokens: tokens to generate at most (>= 0; 0 only scores the prompt, with
            ``prompt_logprobs``).
        temperature: 0 means greedy; otherwise in [1e-4, 1e4] (smaller values overflow
            float32; larger ones are uniform in effect), sampling from
            softmax(logits / temperature).
        top_k: in [0, 2**31 - 1]; keep the k most likely tokens before sampling (ties with
            the k-th are kept, as transformers does); 0 disables.
        top_p: nucleus sampling, keep the smallest set with probability >= top_p; 1 disables.
        min_p: in [0, 1]; after top-k/top-p, drop tokens whose probability is below
            min_p times the most likely token's (transformers' MinPLogitsWarper); 0 disables.
        repetition_penalty: in [0.01, 100]; > 1 discourages tokens already in the text,
            prompt included (CTRL-style, as transformers applies it); 1 disables.
        frequency_penalty: in [-2, 2]; subtracts count * frequency_penalty from the logit
            of every token generated so far in this row (OpenAI semantics; the prompt does
            not count, as in vLLM); 0 disables.
        presence_penalty: in [-2, 2]; subtracts presence_penalty once from the logit of
            every token generated so far in this row (OpenAI semantics); 0 disables.
        min_tokens: in [0, max_new_tokens]; EOS cannot be picked before this many new
            tokens (transformers' MinNewTokensLengthLogitsProcessor); no effect on a model
            without an EOS token. 0 disables.
        seed: seeds the sampler; the same seed gives the same tokens.
        stop: strings that end generation; the text is cut before the first one.
        stop_on_eos: end a row when the model emits its EOS token.
        on_overflow: "error" refuses a prompt + max_new_tokens beyond the context;
            "truncate" keeps the prompt's last tokens and shortens max_new_tokens to fit.
        logprobs: None records nothing; N >= 0 records, per generated token, its
            log-probability and the N most likely alternatives (``Row.logprobs``).
        prompt_logprobs: None records nothing; N in [0, 20] records, per prompt token,
            its log-probability and the N most likely alternatives.
        num_draft_tokens: with a generator that speculates (``draft=``), the most draft
            tokens this row checks per step, in [0, 16] (0: this row does not speculate);
            None takes the generator's. No effect without a drafter.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_on_eos: bool = True
    on_overflow: str = "error"
    logprobs: int | None = None
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    num_draft_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_(self, **changes: object) -> GenerationParams:
        return replace(self, **changes)

    def validate(self) -> None:
        _int("max_new_tokens", self.max_new_tokens, 0, None,
             "ask for 0 (score the prompt only) or more new tokens")
        _num("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidParameterError(
                "temperature", f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InvalidParameterError(
                "temperature", f"temperature must be 0 or >= {MIN_TEMPERATURE:g}, got "
                f"{self.temperature!r} (logits / temperature would overflow float32); "
                "use 0 for greedy.")
        if self.temperature > MAX_TEMPERATURE:
            raise InvalidParameterError(
                "temperature", f"temperature must be <= {MAX_TEMPERATURE:g}, got "
                f"{self.temperature!r} (beyond that every token is equally likely, and "
                "float32 overflows near 3.4e38); use a value such as 0.7-1.5.")
        _int("top_k", self.top_k, 0, None, "use 0 to disable top-k")
        if self.top_k > MAX_TOP_K:
            raise InvalidParameterError(
                "top_k", f"top_k must be <= {MAX_TOP_K} (2**31 - 1), got {self.top_k}; use 0 "
                "to disable top-k (any top_k at or above the vocabulary size keeps every "
                "token).")
        _num("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError(
                "top_p", f"top_p must be in (0, 1], got {self.top_p}; use 1 to disable it.")
        _num("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParameterError(
                "min_p", f"min_p must be in [0, 1], got {self.min_p}; use 0 to disable it.")
        _num("repetition_penalty", self.repetition_penalty)
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise InvalidParameterError(
                "repetition_penalty",
                f"repetition_penalty must be > 0 and in [{low:g}, {high:g}] (1 = off), got "
                f"{self.repetition_penalty}; use 1 to disable it, ~1.2 to discourage repeats.")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _num(name, value)
            low, high = PENALTY_RANGE
            if not low <= value <= high:
                raise InvalidParameterError(
                    name, f"{name} must be in [{low:g}, {high:g}], got {value}; use 0 to "
                    "disable it.")
        _int("min_tokens", self.min_tokens, 0, self.max_new_tokens,
             "use 0 to disable it; it cannot exceed max_new_tokens")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidParameterError(
                "seed", f"seed must be a non-negative integer or None, got {self.seed!r}.")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameterError(
                "stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got "
                f"{len(self.stop)}; keep the ones that matter.")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidParameterError(
                    "stop", f"stop strings must be non-empty strings, got {s!r}.")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_LOGPROBS,
                 "ask for fewer alternatives, or None for no log-probs")
        if self.prompt_logprobs is not None:
            _int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS,
                 "ask for fewer alternatives, or None for no prompt log-probs")
        if self.num_draft_tokens is not None:
            _int("num_draft_tokens", self.num_draft_tokens, 0, MAX_DRAFT_TOKENS,
                 "use 0 to decode this row without speculation, or None for the default")
        if self.on_overflow not in OVERFLOW_MODES:
            raise InvalidParameterError(
                "on_overflow", f"on_overflow must be one of {OVERFLOW_MODES}, got "
                f"{self.on_overflow!r}.")


def _num(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(name, f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise InvalidParameterError(name, f"{name} must be finite, got {value!r}.")


def _int(name: str, value: object, low: int, high: int | None, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(name, f"{name} must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidParameterError(name, f"{name} must be {span}, got {value}; {fix}.")


def check_threads(threads: object) -> None:
    """Refuse an onnxruntime thread count outside [1, MAX_THREADS] (None: onnxruntime's
    default, one per physical core): the rule of the CLIs' --threads and of
    ``Model(threads=)``."""
    if threads is None:
        return
    _int("threads", threads, 1, MAX_THREADS,
         "use about one thread per physical core, or leave it unset for onnxruntime's default")
