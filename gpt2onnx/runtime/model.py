"""``Model``: a loaded model folder and the verbs users call on it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from tokenizers import Tokenizer

from gpt2onnx.contract import LAYOUT_FUSED, Manifest
from gpt2onnx.errors import InvalidParameterError, ModelFolderError
from gpt2onnx.runtime.cache import FusedCache, StandardCache
from gpt2onnx.runtime.folder import make_session, open_manifest, session_device
from gpt2onnx.runtime.generator import Generator
from gpt2onnx.runtime.params import GenerationParams

Prompt = str | Sequence[int]


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
            GPT2ONNX_SPIN=0); turn off on a CPU shared with other busy processes.
        verify: check file hashes against the manifest on load: True skips files whose
            stat stamp is unchanged since they last matched (like git's index); "full"
            hashes every file on every load; False only checks that they exist.
        cuda_graph: on CUDA with a fused folder, replay decode steps from a CUDA graph.
    """

    def __init__(self, folder: str | Path, provider: str = "cpu", threads: int | None = None,
                 verify: bool | str = True, cuda_graph: bool = False,
                 spinning: bool | None = None) -> None:
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
        self.session: ort.InferenceSession = make_session(
            self.folder, self.manifest, provider, threads=threads, cuda_graph=cuda_graph,
            spinning=spinning)
        self.device = session_device(provider)
        self._caches: dict[int, FusedCache | StandardCache] = {}

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
        """The KV cache for a batch size: fused caches are allocated once and reused."""
        if self.manifest.layout != LAYOUT_FUSED:
            return StandardCache(self.session, self.manifest, batch_size, self.device, self.pad_id)
        if batch_size not in self._caches:
            self._caches[batch_size] = FusedCache(self.session, self.manifest, batch_size,
                                                  self.device, cuda_graph=self.cuda_graph)
        return self._caches[batch_size]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt", "prompt is empty; give some text.")
            return self.encode(prompt)
        if isinstance(prompt, (bytes, bytearray)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidParameterError("prompt", "prompt must be a string or a list of "
                                        f"integer token ids, got {type(prompt).__name__}.")
        return list(prompt)

    def generator(self, prompts: Sequence[Prompt],
                  params: GenerationParams | Sequence[GenerationParams] | None = None,
                  batch_size: int | None = None) -> Generator:
        """A step-level generator over prompts (text or token ids); ``batch_size`` leaves
        free slots for rows added later with ``Generator.add`` (fused layout)."""
        if not prompts and batch_size is None:
            raise InvalidParameterError("prompt", "no prompts given; pass at least one.")
        return Generator(self, [self._prompt_ids(p) for p in prompts],
                         params if params is not None else GenerationParams(), batch_size)

    def generate_batch(self, prompts: Sequence[Prompt],
                       params: GenerationParams | Sequence[GenerationParams] | None = None
                       ) -> list[GenerationResult]:
        """Generate for several prompts in one batch; each row gets the tokens it would get
        alone."""
        gen = self.generator(prompts, params)
        while not gen.is_done():
            gen.generate_next_token()
        return [_result(row, gen) for row in gen.rows]

    def generate(self, prompt: Prompt, params: GenerationParams | None = None,
                 **kwargs) -> GenerationResult:
        """Generate for one prompt. Keyword arguments build a ``GenerationParams``."""
        params = _params(params, kwargs)
        return self.generate_batch([prompt], params)[0]

    def stream(self, prompt: Prompt, params: GenerationParams | None = None,
               **kwargs) -> Iterator[str]:
        """Yield the new text piece by piece as it is generated (valid UTF-8 each time)."""
        gen = self.generator([prompt], _params(params, kwargs))
        while not gen.is_done():
            gen.generate_next_token()
            piece = gen.stream_text(0)
            if piece:
                yield piece
        rest = gen.stream_text(0)
        if rest:
            yield rest


def _params(params: GenerationParams | None, kwargs: dict) -> GenerationParams:
    if params is not None and kwargs:
        return params.with_(**kwargs)
    return params if params is not None else GenerationParams(**kwargs)


def _result(row, gen: Generator) -> GenerationResult:
    return GenerationResult(
        text=row.text, token_ids=list(row.token_ids), prompt_token_ids=list(row.prompt_ids),
        finish_reason=row.finish_reason or "length", prefill_ms=gen.timings.prefill_ms,
        decode_ms_per_token=gen.timings.decode_ms_per_token)
