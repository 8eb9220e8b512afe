"""``Model``: a loaded model folder and the verbs users call on it."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from tokenizers import Tokenizer

from gpt2onnx.contract import LAYOUT_FUSED, Manifest
from gpt2onnx.errors import InvalidParameterError, ModelFolderError
from gpt2onnx.runtime.cache import FusedCache, StandardCache
from gpt2onnx.runtime.folder import (
    check_tokenizer_fits,
    make_session,
    open_manifest,
    session_device,
    spin_from_env,
)
from gpt2onnx.runtime.generator import Generator
from gpt2onnx.runtime.mixed_cache import MixedFusedCache
from gpt2onnx.runtime.params import GenerationParams, check_threads
from gpt2onnx.runtime.prefix_cache import PrefixCache
from gpt2onnx.runtime.scoring import ScoreResult, score_ids

Prompt = str | Sequence[int]
IDLE_CACHES = 2  # finished generators' caches a Model keeps for reuse


@dataclass
class GenerationResult:
    """What one prompt produced."""

    text: str
    token_ids: list[int]  # new tokens only (EOS included when it ended the row)
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prefill_ms: float
    decode_ms_per_token: float

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "finish_reason": self.finish_reason,
            "timings": {"prefill_ms": round(self.prefill_ms, 3),
                        "decode_ms_per_token": round(self.decode_ms_per_token, 3)},
        }


class Model:
    """A model folder loaded on one execution provider.

    Args:
        folder: a folder written by ``python -m gpt2onnx.export`` (or by optimum-cli).
        provider: "cpu" or "cuda" (needs onnxruntime-gpu).
        threads: intra-op threads (default: onnxruntime's choice, one per physical core).
        spinning: idle intra-op threads busy-wait for work (default: on unless
            GPT2ONNX_SPIN=0); turn off on a CPU shared with other busy processes. "run":
            only within a run, for a model and its speculative draft taking turns on the
            same cores (see ``session_options``).
        verify: check file hashes against the manifest on load: True skips files whose
            stat stamp is unchanged since they last matched (like git's index); "full"
            hashes every file on every load; False only checks that they exist.
        cuda_graph: on CUDA with a fused folder, replay decode steps from a CUDA graph.
        target_check: refuse a folder exported for another provider (False only for
            validation: a CUDA folder's numbers checked on the CPU kernels).
        mixed: load the folder's mixed graph where it has one (CPU fused folders), so
            that one model run takes one-token rows and a prompt chunk together (a
            serving engine's steps); ``self.mixed`` says whether it did. A lone row pays
            one dummy token per step for it, so single-stream use keeps the plain graph.
    """

    def __init__(self, folder: str | Path, provider: str = "cpu", threads: int | None = None,
                 verify: bool | str = True, cuda_graph: bool = False,
                 spinning: bool | str | None = None, target_check: bool = True,
                 mixed: bool = False) -> None:
        check_threads(threads)
        self.folder = Path(folder)
        self.provider = provider
        if cuda_graph and provider != "cuda":
            raise InvalidParameterError(
                "cuda_graph", f"cuda_graph=True needs provider='cuda', got {provider!r}; CUDA "
                "graphs replay GPU kernels only.")
        self.cuda_graph = cuda_graph
        self.manifest: Manifest = open_manifest(self.folder, verify=verify)
        tok_path = self.folder / self.manifest.tokenizer_file
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            raise ModelFolderError(f"cannot read {tok_path}: {exc}. Re-export the folder.") from exc
        check_tokenizer_fits(self.tokenizer, self.manifest, tok_path)
        self.spinning = spin_from_env() if spinning is None else spinning
        self._vocab_digest: str | None = None
        self.mixed = bool(mixed and self.manifest.mixed_graph_file is not None
                          and provider == "cpu")
        self.session: ort.InferenceSession = make_session(
            self.folder, self.manifest, provider, threads=threads, cuda_graph=cuda_graph,
            spinning=spinning, target_check=target_check, mixed=self.mixed)
        self.device = session_device(provider)
        # Fused caches of finished generators, kept for reuse (allocation and, on CUDA,
        # graph capture are not free); at most IDLE_CACHES, the most recently returned.
        self._idle: list[FusedCache] = []
        self._idle_lock = threading.Lock()
        # Draft models loaded from a folder path (``draft="DIR"``), once per folder.
        self._drafts: dict[str, Model] = {}

    @classmethod
    def load(cls, folder: str | Path, **kwargs) -> Model:
        """Same as ``Model(folder, ...)``."""
        return cls(folder, **kwargs)

    @property
    def context_length(self) -> int:
        """Longest prompt + generated text this folder can hold."""
        m = self.manifest
        return m.max_length if m.layout == LAYOUT_FUSED and m.max_length else m.context_length

    @property
    def pad_id(self) -> int:
        m = self.manifest
        for candidate in (m.pad_token_id, m.eos_token_id, 0):
            if candidate is not None:
                return candidate
        return 0

    def cache(self, batch_size: int) -> FusedCache | StandardCache:
        """A KV cache of ``batch_size`` slots for the caller alone (a ``Generator`` takes
        one and hands it back when it is gone). Nobody else holds it: two generators never
        share buffers.

        Memory: the caches of live generators, plus at most ``IDLE_CACHES`` idle ones
        (the most recently returned) kept for reuse; a fused cache is
        2 x n_layer x batch x n_head x max_length x head_dim cache elements
        (gpt2 at 1,024 tokens: 75 MB per slot in fp32; `python -m gpt2onnx.kvmem`).
        """
        if self.manifest.layout != LAYOUT_FUSED:
            return StandardCache(self.session, self.manifest, batch_size, self.device, self.pad_id)
        with self._idle_lock:
            for i, cache in enumerate(self._idle):
                if cache.batch_size == batch_size:
                    del self._idle[i]
                    cache.reset()
                    return cache
        if self.mixed:
            return MixedFusedCache(self.session, self.manifest, batch_size, self.device)
        return FusedCache(self.session, self.manifest, batch_size, self.device,
                          cuda_graph=self.cuda_graph)

    def _return_cache(self, cache: FusedCache | StandardCache) -> None:
        """A generator is done with ``cache``: keep it for reuse, within the bound."""
        if not isinstance(cache, FusedCache):
            return
        cache.reset()
        with self._idle_lock:
            self._idle.append(cache)
            del self._idle[:-IDLE_CACHES]

    @property
    def vocab_digest(self) -> str:
        """sha256 of the tokenizer's token -> id map (a draft must share it)."""
        if self._vocab_digest is None:
            vocab = sorted(self.tokenizer.get_vocab().items())
            self._vocab_digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
        return self._vocab_digest

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (InvalidParameterError for anything but valid Unicode
        text: every text entry point of the model comes through here)."""
        return self.tokenizer.encode(check_text(text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt", "prompt is empty; give some text.")
            return self.encode(prompt)
        if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidParameterError("prompt", "prompt must be a string or a list of "
                                        f"integer token ids, got {type(prompt).__name__}.")
        return list(prompt)

    def generator(self, prompts: Sequence[Prompt],
                  params: GenerationParams | Sequence[GenerationParams] | None = None,
                  batch_size: int | None = None, draft: object = None,
                  num_draft_tokens: int = 8, speculative_max_batch: int = 2,
                  prefix_cache: PrefixCache | None = None) -> Generator:
        """A step-level generator over prompts (text or token ids); ``batch_size`` leaves
        free slots for rows added later with ``Generator.add`` (fused layout).

        Speculative decoding: ``draft`` is ``"ngram"`` (prompt lookup), a draft ``Model`` or
        a draft model folder (same tokenizer; a smaller GPT-2 or an int8/int4 export of
        this checkpoint). Each step then checks up to ``num_draft_tokens`` drafted tokens
        per row (adapted to how many get accepted) while at most
        ``speculative_max_batch`` rows are running; greedy output is unchanged and sampled
        output keeps its distribution.

        ``prefix_cache``: a ``PrefixCache`` whose stored prompt blocks rows added later
        reuse (and add to); CPU folders only.
        """
        if not prompts and batch_size is None:
            raise InvalidParameterError("prompt", "no prompts given; pass at least one.")
        return Generator(self, [self._prompt_ids(p) for p in prompts],
                         params if params is not None else GenerationParams(), batch_size,
                         draft=draft, num_draft_tokens=num_draft_tokens,
                         speculative_max_batch=speculative_max_batch,
                         prefix_cache=prefix_cache)

    def generate_batch(self, prompts: Sequence[Prompt],
                       params: GenerationParams | Sequence[GenerationParams] | None = None,
                       draft: object = None, **speculative: int) -> list[GenerationResult]:
        """Generate for several prompts in one batch; each row gets the tokens it would get
        alone. ``draft`` and ``num_draft_tokens`` / ``speculative_max_batch``: see
        ``generator``."""
        gen = self.generator(prompts, params, draft=draft, **speculative)
        try:
            while not gen.is_done():
                gen.generate_next_token()
            return [_result(row, gen) for row in gen.rows]
        finally:
            gen.close()

    def generate(self, prompt: Prompt, params: GenerationParams | None = None,
                 draft: object = None, **kwargs) -> GenerationResult:
        """Generate for one prompt. Keyword arguments build a ``GenerationParams``;
        ``draft`` speculates (see ``generator``)."""
        params = _params(params, kwargs)
        return self.generate_batch([prompt], params, draft=draft)[0]

    def score(self, text: Prompt, top_logprobs: int = 0, window: int | None = None,
              stride: int | None = None) -> ScoreResult:
        """Each token's log-probability given the text before it (the first has none),
        and the ``top_logprobs`` most likely tokens at each position. Texts longer than
        the context are scored with a sliding window (see ``gpt2onnx.runtime.scoring``).

        Returns a ``ScoreResult`` (``logprobs``, ``top_logprobs``, ``perplexity``)."""
        return score_ids(self, self._prompt_ids(text), top_logprobs=top_logprobs,
                         window=window, stride=stride)

    def stream(self, prompt: Prompt, params: GenerationParams | None = None,
               draft: object = None, **kwargs) -> Iterator[str]:
        """Yield the new text piece by piece as it is generated (valid UTF-8 each time)."""
        gen = self.generator([prompt], _params(params, kwargs), draft=draft)
        while not gen.is_done():
            gen.generate_next_token()
            piece = gen.stream_text(0)
            if piece:
                yield piece
        rest = gen.stream_text(0)
        if rest:
            yield rest


def check_text(text: object, param: str = "prompt") -> str:
    """``text`` if it is a str the tokenizer can take; a lone surrogate (what Python makes
    of bytes that are not UTF-8, e.g. in argv) is refused with its position."""
    if not isinstance(text, str):
        raise InvalidParameterError(param, f"{param} must be a string, got "
                                    f"{type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameterError(
            param, f"{param} holds {text[exc.start]!r} at character {exc.start}, a lone "
            "surrogate that is not Unicode text (often bytes that were not UTF-8); pass "
            "UTF-8 text.") from None
    return text


def _params(params: GenerationParams | None, kwargs: dict) -> GenerationParams:
    if params is not None and kwargs:
        return params.with_(**kwargs)
    return params if params is not None else GenerationParams(**kwargs)


def _result(row, gen: Generator) -> GenerationResult:
    return GenerationResult(
        text=row.text, token_ids=list(row.token_ids), prompt_token_ids=list(row.prompt_ids),
        finish_reason=row.finish_reason or "length", prefill_ms=gen.timings.prefill_ms,
        decode_ms_per_token=gen.timings.decode_ms_per_token)


def gen_result(gen: Generator, slot: int = 0) -> GenerationResult:
    """The ``GenerationResult`` of one finished row of a generator."""
    return _result(gen.rows[slot], gen)
