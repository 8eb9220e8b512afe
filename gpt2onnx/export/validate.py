"""Validate an exported folder against the PyTorch model it came from.

The folder is run through the runtime's own cache and decode loop (what users will
run), and compared with transformers' GPT2LMHeadModel, each prompt alone:
  1. the prompt step (past 0; rows of different lengths, so padding is exercised),
  2. decode steps (past > 0),
  3. 32 greedy tokens against ``GPT2LMHeadModel.generate``.
Every output gets a line with its max |diff|, the threshold and a check or a cross.
Metrics follow ONNX Runtime's GPT-2 parity tool: |diff| percentiles, top-1 agreement.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpt2onnx.contract import cache_names

GREEDY_STEPS = 32


@dataclass(frozen=True)
class Thresholds:
    """Pass marks of one precision. Logit errors are relative to the reference logits'
    range (max - min), cache errors to the cache's largest magnitude. Agreement marks
    apply when the reference is a trained model: with random weights the distribution is
    near-uniform, argmax is a coin toss, and only the logit error is meaningful."""

    logits_rel: float
    cache_rel: float
    top1: float  # fraction of compared positions whose argmax equals the reference's
    greedy: float  # teacher-forced: fraction of transformers' 32 greedy tokens we also pick
    greedy_exact: bool  # free-running: our 32 greedy tokens are transformers' exactly


THRESHOLDS = {
    "fp32": Thresholds(logits_rel=1e-4, cache_rel=1e-4, top1=1.0, greedy=1.0, greedy_exact=True),
    "fp16": Thresholds(logits_rel=2e-2, cache_rel=2e-2, top1=0.98, greedy=0.97,
                       greedy_exact=False),
    "int8": Thresholds(logits_rel=1e-1, cache_rel=1e-1, top1=0.90, greedy=0.90,
                       greedy_exact=False),
    # 4-bit weights: cache error grows with depth (0.31 at layer 7 of a random gpt2).
    "int4": Thresholds(logits_rel=2.5e-1, cache_rel=5e-1, top1=0.80, greedy=0.80,
                       greedy_exact=False),
}
# Median top-1 probability under which the reference counts as untrained (near-uniform).
TRAINED_CONFIDENCE = 0.05
# Prompts for the checks: real text keeps a trained model in distribution.
TEXTS = (
    "Return a new list containing all items from the iterable in ascending order.",
    "The module provides functions for working with files and directories, such as",
    "If the optional argument is given, the function raises a ValueError when the value",
    "Once upon a time there was a little town by the sea where everybody knew each other.",
)


@dataclass
class Check:
    name: str
    value: float
    threshold: float
    passed: bool
    higher_is_better: bool = False
    skipped: str = ""  # why the check does not apply (it then passes)

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        if self.skipped:
            return f"  - {self.name:<30} {self.value:.3g} (not checked: {self.skipped})"
        mark = "✓" if self.passed else "✗"
        return f"  {mark} {self.name:<30} {self.value:.3g} (threshold {op} {self.threshold:.3g})"


@dataclass
class ValidationReport:
    precision: str
    thresholds: dict[str, Any]
    validated_on: str = "cpu"  # the provider the numbers come from, and why
    checks: list[Check] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def summary(self) -> str:
        return "\n".join(c.line() for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "passed": self.passed,
                "validated_on": self.validated_on,
                "thresholds": self.thresholds, "checks": [asdict(c) for c in self.checks],
                "metrics": self.metrics}


def _layer_kv(cache: Any, layer: int) -> tuple[Any, Any]:
    """(key, value) of one layer from a transformers cache object (4.57 and 5.x)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer]


class _TorchRow:
    """The PyTorch reference for one prompt run alone (batch 1, no padding)."""

    def __init__(self, model: Any, ids: list[int]) -> None:
        import torch

        self.torch = torch
        self.model = model
        # transformers 5 renamed forward's past_key_values to cache; 4.57 knows only the old name.
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
        self.cache = out.past_key_values
        self.all_logits = out.logits[0].float().numpy()  # [len, vocab]
        self.logits = self.all_logits[-1]

    def step(self, *tokens: int) -> None:
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.tensor([list(tokens)]),
                             **{self.cache_kw: self.cache}, use_cache=True)
        self.cache = out.past_key_values
        self.all_logits = out.logits[0].float().numpy()
        self.logits = self.all_logits[-1]

    def kv(self, index: int) -> np.ndarray:
        key, value = _layer_kv(self.cache, index // 2)
        return (key if index % 2 == 0 else value)[0].float().numpy()


class _Errors:
    """Collects |diff| statistics and argmax agreement across steps."""

    def __init__(self, n_cache: int) -> None:
        self.logit_diffs: list[np.ndarray] = []
        self.logit_rel = 0.0
        self.top1: list[bool] = []
        self.confidence: list[float] = []  # reference top-1 probability per position
        self.cache_rel = [0.0] * n_cache

    def add_logits(self, ours: np.ndarray, ref: np.ndarray) -> None:
        diff = np.abs(ours.astype(np.float64) - ref)
        self.logit_diffs.append(diff)
        span = float(ref.max() - ref.min()) or 1.0
        self.logit_rel = max(self.logit_rel, float(diff.max()) / span)
        self.top1.append(int(np.argmax(ours)) == int(np.argmax(ref)))
        shifted = ref - ref.max()
        self.confidence.append(float(1.0 / np.exp(shifted).sum()))

    def add_cache(self, index: int, ours: np.ndarray, ref: np.ndarray) -> None:
        diff = float(np.abs(ours.astype(np.float64) - ref).max()) if ref.size else 0.0
        scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1.0)
        self.cache_rel[index] = max(self.cache_rel[index], diff / scale)


def validation_provider(target: str) -> tuple[str, str]:
    """Where a folder built for ``target`` is validated, and why: on CUDA when this
    onnxruntime build has the CUDA provider (a build without a working device then fails
    the export loudly rather than passing unchecked); otherwise a CUDA folder has its
    numbers checked on the CPU provider (fused fp16 and int4 have CPU kernels)."""
    if target != "cuda":
        return "cpu", "cpu"
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return "cuda", "cuda"
    return "cpu", ("cpu provider: this onnxruntime has no CUDA provider, so the CUDA "
                   "folder's numbers were checked on the CPU kernels, not on a GPU")


def validate_folder(folder: Path, torch_model: Any, precision: str, provider: str = "cpu",
                    n_batches: int = 2, decode_steps: int = 3, seed: int = 0,
                    thresholds: Thresholds | None = None,
                    validated_on: str = "") -> ValidationReport:
    """Compare ``folder`` with ``torch_model``; returns a report (``.passed`` says if it held).

    Args:
        provider: the provider to run the folder on (it may differ from the one the
            folder targets: see ``validation_provider``).
        validated_on: what to say about where it ran (the report keeps it).
    """
    import torch

    # The runtime validates what it will run; it never imports the exporter, only the reverse.
    from gpt2onnx.runtime.cache import Append
    from gpt2onnx.runtime.model import Model
    from gpt2onnx.runtime.params import GenerationParams

    th = thresholds or THRESHOLDS[precision]
    model = Model(folder, provider=provider, verify=False, target_check=False)
    m = model.manifest
    rng = np.random.default_rng(seed)
    names = cache_names(m.n_layer)
    err = _Errors(len(names))
    capacity = min(model.context_length, 64)
    tokenizer_check, texts = _tokenizer_round_trip(folder, m.tokenizer_file, m.vocab_size,
                                                   capacity)
    texts = texts or [[]]

    for b in range(n_batches):
        # Two rows of different lengths (the shorter is padded by the layout), cut from
        # real text; decode steps feed the reference's own greedy tokens.
        lengths = sorted(rng.integers(1, capacity // 2, size=2).tolist(), reverse=True)
        if lengths[0] == lengths[1]:
            lengths[1] = max(1, lengths[0] - 3)
        rows = [_cut(texts[(2 * b + k) % len(texts)], n, rng, m.vocab_size)
                for k, n in enumerate(lengths)]
        refs = [_TorchRow(torch_model, r) for r in rows]
        cache = model.cache(len(rows))
        # The prompt step returns logits at every position where the graph can (format 2).
        keep = [len(r) if m.any_logits else 1 for r in rows]
        res = cache.step([Append(i, r, k) for i, (r, k) in enumerate(zip(rows, keep,
                                                                          strict=True))])
        for i, ref in enumerate(refs):
            for ours, theirs in zip(res.logits(i)[:-1], ref.all_logits[len(rows[i]) - keep[i]:],
                                    strict=False):
                err.add_logits(ours, theirs)
        ours = [res.logits(i)[-1] for i in range(len(rows))]
        for step in range(decode_steps + 1):
            for i, ref in enumerate(refs):
                err.add_logits(ours[i], ref.logits)
                for j in range(len(names)):
                    err.add_cache(j, cache.row_kv(j, i), ref.kv(j))
            if step == decode_steps:
                break
            tokens = [int(np.argmax(ref.logits)) for ref in refs]
            for ref, t in zip(refs, tokens, strict=True):
                ref.step(t)
            res = cache.step([Append(i, [t]) for i, t in enumerate(tokens)])
            ours = [res.logits(i)[-1] for i in range(len(rows))]
        if m.any_logits:
            # Three tokens onto a slot with a past, logits at all three (a verification).
            more = _cut(texts[(2 * b + 1) % len(texts)][::-1], 3, rng, m.vocab_size)
            refs[0].step(*more)
            res = cache.step([Append(0, more, 3)])
            for ours_row, theirs in zip(res.logits(0), refs[0].all_logits, strict=True):
                err.add_logits(ours_row, theirs)
            for j in range(len(names)):
                err.add_cache(j, cache.row_kv(j, 0), refs[0].kv(j))
        model._return_cache(cache)

    # 32 greedy tokens: transformers' generate vs the runtime's loop (free-running), and
    # our argmax along transformers' path (teacher-forced).
    prompt = texts[0][:8] if len(texts[0]) >= 8 else rng.integers(0, m.vocab_size, 8).tolist()
    steps = min(GREEDY_STEPS, model.context_length - len(prompt))
    with torch.no_grad():
        hf = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                  dtype=torch.long), max_new_tokens=steps, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    hf_tokens = hf[0, len(prompt):].tolist()
    got = model.generate(prompt, GenerationParams(max_new_tokens=steps, stop_on_eos=False))
    prefix = next((i for i, (a, b) in enumerate(zip(got.token_ids, hf_tokens, strict=False))
                   if a != b), min(len(got.token_ids), len(hf_tokens)))
    cache = model.cache(1)
    logits = cache.step([Append(0, prompt)]).logits(0)[-1]
    forced = []
    for t in hf_tokens:
        forced.append(int(np.argmax(logits)) == t)
        logits = cache.step([Append(0, [t])]).logits(0)[-1]
    forced_rate = float(np.mean(forced))

    all_diffs = np.concatenate([d.ravel() for d in err.logit_diffs])
    confidence = float(np.median(err.confidence))
    untrained = "" if confidence >= TRAINED_CONFIDENCE else (
        f"reference near-uniform, median top-1 p={confidence:.2g} (random weights)")
    report = ValidationReport(precision=precision, thresholds=asdict(th),
                              validated_on=validated_on or provider)
    report.checks.append(tokenizer_check)
    report.checks.append(Check("logits max|diff|/range", err.logit_rel, th.logits_rel,
                               err.logit_rel <= th.logits_rel))
    for j, (_, present) in enumerate(names):
        report.checks.append(Check(f"{present} max|diff|", err.cache_rel[j], th.cache_rel,
                                   err.cache_rel[j] <= th.cache_rel))
    exact = th.greedy_exact
    top1 = float(np.mean(err.top1))
    skip = "" if exact else untrained
    report.checks.append(Check("top-1 agreement", top1, th.top1,
                               bool(skip) or top1 >= th.top1, True, skip))
    report.checks.append(Check("greedy agreement (forced)", forced_rate, th.greedy,
                               bool(skip) or forced_rate >= th.greedy, True, skip))
    if exact:
        report.checks.append(Check(f"greedy tokens equal (of {steps})", prefix, steps,
                                   prefix >= steps, True))
    report.metrics = {
        "logits_abs_diff": {f"p{q}": float(np.percentile(all_diffs, q)) for q in (50, 90, 99)}
        | {"max": float(all_diffs.max())},
        "positions_compared": len(err.top1),
        "top1_agreement": top1,
        "greedy_forced_agreement": forced_rate,
        "greedy_free_running_prefix": prefix,
        "reference_median_top1_probability": confidence,
        "greedy_reference": hf_tokens,
        "greedy_ours": got.token_ids,
    }
    return report


TOKENIZER_CHECK = "tokenizer round trip (texts)"


def _tokenizer_round_trip(folder: Path, tokenizer_file: str, vocab: int, capacity: int
                          ) -> tuple[Check, list[list[int]]]:
    """Encode and decode the sample texts with the folder's own tokenizer.json (what the
    runtime will use): a text passes when its ids are inside the model's vocabulary and
    decode back to the text. Returns the check and the ids of the texts that passed,
    which the comparisons then run through the runtime and PyTorch."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / tokenizer_file))
    passed = []
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if ids and max(ids) < vocab and tokenizer.decode(ids, skip_special_tokens=False) == text:
            passed.append(ids[: capacity // 2])
    check = Check(TOKENIZER_CHECK, len(passed), len(TEXTS), len(passed) == len(TEXTS), True)
    return check, passed


def _cut(ids: list[int], n: int, rng: np.random.Generator, vocab: int) -> list[int]:
    """n tokens of real text (random ids when the text is shorter or missing)."""
    if len(ids) >= n:
        return ids[:n]
    return ids + rng.integers(0, vocab, size=n - len(ids)).tolist()
