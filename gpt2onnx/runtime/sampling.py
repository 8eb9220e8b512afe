"""Pick the next token from one row of logits, as transformers' logits processors do.

Order (as in transformers' generate): repetition penalty, temperature, top-k, top-p,
then a draw from the row's own seeded generator.
"""

from __future__ import annotations

import numpy as np

from gpt2onnx.runtime.params import GenerationParams


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """In place: tokens already in the text get logit / penalty (or * penalty if negative)."""
    if penalty == 1.0 or seen.size == 0:
        return
    scores = logits[seen]
    logits[seen] = np.where(scores < 0, scores * penalty, scores / penalty)


def sample_token(logits: np.ndarray, params: GenerationParams, rng: np.random.Generator
                 ) -> int:
    """Draw one token id from ``logits`` ([vocab] fp32, already penalised)."""
    scaled = logits / np.float32(params.temperature)
    vocab = scaled.shape[0]
    if 0 < params.top_k < vocab:
        candidates = np.argpartition(scaled, -params.top_k)[-params.top_k:]
    else:
        candidates = np.arange(vocab)
    cand_logits = scaled[candidates]
    order = np.argsort(-cand_logits, kind="stable")
    candidates, cand_logits = candidates[order], cand_logits[order]
    probs = np.exp(cand_logits - cand_logits[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        cumulative = np.cumsum(probs)
        keep = int(np.searchsorted(cumulative, params.top_p) + 1)
        candidates, probs = candidates[:keep], probs[:keep] / cumulative[keep - 1]
    idx = int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"))
    return int(candidates[min(idx, len(candidates) - 1)])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[..., vocab] -> log-probabilities, numerically stable."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
