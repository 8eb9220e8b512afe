"""What goes into the engine (``EngineRequest``) and what comes out (``ChoiceDelta`` step
by step, ``Completion`` in the end). Plain data: no HTTP, no threads."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gpt2onnx.runtime.generator import TokenLogprob
from gpt2onnx.runtime.params import GenerationParams


@dataclass(frozen=True)
class RowSpec:
    """One output row (an OpenAI "choice"): a prompt and how to continue it."""

    prompt_ids: tuple[int, ...]
    params: GenerationParams


@dataclass(frozen=True)
class EngineRequest:
    """Rows that start together (they share a queue position) and finish independently.
    Row i is choice ``index`` i of the response."""

    rows: tuple[RowSpec, ...]
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")

    @classmethod
    def of(cls, prompt_ids: Sequence[int], params: GenerationParams, n: int = 1
           ) -> EngineRequest:
        """``n`` rows of one prompt; with a seed, row j samples with ``seed + j`` so the rows
        differ yet the request as a whole is reproducible."""
        return cls(tuple(RowSpec(tuple(prompt_ids), derive_seed(params, j)) for j in range(n)))

    @property
    def prompt_tokens(self) -> int:
        """Distinct prompts count once however many choices continue them (as OpenAI)."""
        return sum(len(p) for p in dict.fromkeys(r.prompt_ids for r in self.rows))


def derive_seed(params: GenerationParams, j: int) -> GenerationParams:
    return params if params.seed is None or j == 0 else params.with_(seed=params.seed + j)


@dataclass
class ChoiceDelta:
    """What one row produced since the previous delta; ``finish_reason`` is set on its last
    ("stop" for EOS or a stop string, "length" for max_new_tokens)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    # In a row's first delta, when its params asked for prompt log-probs: one per prompt
    # token, None for the first (nothing to condition on).
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_deltas(deltas: Iterable[ChoiceDelta]) -> list[ChoiceDelta]:
    """One delta per choice, in order of first appearance: consecutive steps read by a
    slow consumer go out as one chunk."""
    merged: dict[int, ChoiceDelta] = {}
    for d in deltas:
        if d.index not in merged:
            merged[d.index] = ChoiceDelta(d.index, d.text, list(d.token_ids), list(d.logprobs),
                                          d.finish_reason, d.prompt_logprobs)
            continue
        m = merged[d.index]
        m.text += d.text
        m.token_ids += d.token_ids
        m.logprobs += d.logprobs
        m.finish_reason = d.finish_reason or m.finish_reason
        m.prompt_logprobs = m.prompt_logprobs or d.prompt_logprobs
    return list(merged.values())


@dataclass
class Completion:
    """Every choice of a finished request, plus token counts."""

    request: EngineRequest
    choices: list[ChoiceDelta] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.choices:
            self.choices = [ChoiceDelta(i, "", [], []) for i in range(len(self.request.rows))]

    def add(self, deltas: Iterable[ChoiceDelta]) -> None:
        for d in deltas:
            c = self.choices[d.index]
            c.text += d.text
            c.token_ids += d.token_ids
            c.logprobs += d.logprobs
            c.finish_reason = d.finish_reason or c.finish_reason
            c.prompt_logprobs = c.prompt_logprobs or d.prompt_logprobs

    @property
    def prompt_tokens(self) -> int:
        return self.request.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)
