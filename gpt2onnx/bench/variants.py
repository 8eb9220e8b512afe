"""The variants under test and the engine each one runs inside its worker process.

An engine answers two questions with the same prompt for everyone:
``decode(prompt, new_tokens, batch)`` (prefill, then one timed step per token) and
``position_ms(prompt, positions, window)`` (per-token latency as the context grows).
Heavy imports stay inside the engines: the optimum engine runs in its own venv, with
another transformers, and must not import anything else from gpt2onnx.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

KIND_TORCH_UNCACHED = "torch-uncached"
KIND_TORCH_CACHED = "torch-cached"
KIND_HF_GENERATE = "hf-generate"
KIND_OPTIMUM = "optimum"
KIND_GENAI = "genai"
KIND_OURS = "ours"
# llama.cpp (peer_llamacpp.py): our gen_ids over libllama, on GGUF files.
KIND_LLAMACPP = "llamacpp"
# CTranslate2 (peer_ct2.py) and OpenVINO GenAI (peer_openvino.py), each in its own venv.
KIND_CT2 = "ct2"
KIND_OPENVINO = "openvino"
# Peers that run in their own venvs (``make bench-setup`` builds them), by folder name.
OPTIMUM_VENV = ".venv-optimum"
GENAI_VENV = ".venv-genai"
# Only the GGUF converter runs there; the llama.cpp worker is this interpreter (stdlib).
LLAMACPP_VENV = ".venv-llamacpp"
CT2_VENV = ".venv-ct2"  # tools/peers/setup_ct2.sh
OPENVINO_VENV = ".venv-openvino"  # make bench-openvino-setup
TORCH_KINDS = (KIND_TORCH_UNCACHED, KIND_TORCH_CACHED, KIND_HF_GENERATE)


@dataclass(frozen=True)
class Variant:
    """One thing to measure. ``folder`` is filled in by the bench once exports exist."""

    name: str
    kind: str
    label: str
    layout: str | None = None
    precision: str = "fp32"
    provider: str = "cpu"
    venv: str | None = None  # a peer's own venv (repo-relative); None: this interpreter
    int4_block_size: int | None = None  # ours at int4: the export's block (None: default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ours(layout: str, precision: str, provider: str = "cpu",
          block: int | None = None) -> Variant:
    suffix = ("" if provider == "cpu" else f"-{provider}") + (f"-b{block}" if block else "")
    label = (f"gpt2onnx {layout} {precision}{' ' + provider if provider != 'cpu' else ''}"
             f"{f' block {block}' if block else ''}")
    return Variant(name=f"ours-{layout}-{precision}{suffix}", kind=KIND_OURS, label=label,
                   layout=layout, precision=precision, provider=provider,
                   int4_block_size=block)


# int4 at OpenVINO's default group size (128; ours defaults to 32, as llama.cpp's q4_0):
# the like-for-like row against OpenVINO int4, and what the faster setting gives.
INT4_COARSE_BLOCK = 128


ALL_VARIANTS: tuple[Variant, ...] = (
    Variant("torch-uncached", KIND_TORCH_UNCACHED, "PyTorch, no cache (re-feed the text)"),
    Variant("torch-cached", KIND_TORCH_CACHED, "PyTorch, past_key_values loop"),
    Variant("hf-generate", KIND_HF_GENERATE, "transformers generate"),
    Variant("optimum", KIND_OPTIMUM, "optimum ORTModelForCausalLM.generate",
            venv=OPTIMUM_VENV),
    # onnxruntime-genai's own loop on our standard fp32 folder (its genai_config.json):
    # the same graph as ours-standard-fp32, so the difference is the two runtimes.
    Variant("genai", KIND_GENAI, "onnxruntime-genai on our standard fp32 folder",
            layout="standard", venv=GENAI_VENV),
    _ours("standard", "fp32"),
    _ours("fused", "fp32"),
    _ours("fused", "int8"),
    _ours("fused", "int4"),
    _ours("fused", "int4", block=INT4_COARSE_BLOCK),
    # llama.cpp built from the source llama-cpp-python's sdist vendors (GGML_NATIVE=ON),
    # GGUF f32 and its llama-quantize q8_0 / q4_0; tools/peers/setup_llamacpp.sh.
    *(Variant(f"llamacpp-{gguf}", KIND_LLAMACPP, f"llama.cpp GGUF {gguf}",
              precision=precision, venv=LLAMACPP_VENV)
      for gguf, precision in (("f32", "fp32"), ("q8_0", "int8"), ("q4_0", "int4"))),
    # CTranslate2's Generator on ct2-transformers-converter's folders (fp32, int8 weights),
    # each precision on its faster GEMM backend on this CPU (peer_ct2.USE_MKL).
    *(Variant(f"ct2-{precision}", KIND_CT2, f"CTranslate2 {precision}",
              precision=precision, venv=CT2_VENV) for precision in ("fp32", "int8")),
    # OpenVINO GenAI's pipeline on optimum-intel IRs; fp32 asks for f32 compute and cache
    # (the CPU plugin's default here is bf16 / f16), int8 and int4 run at its defaults.
    *(Variant(f"openvino-{precision}", KIND_OPENVINO, f"OpenVINO GenAI {precision}",
              precision=precision, venv=OPENVINO_VENV)
      for precision in ("fp32", "int8", "int4")),
)
# On CUDA the fused graph takes fp16 or int4 (GroupQueryAttention's CUDA kernel is fp16).
CUDA_VARIANTS: tuple[Variant, ...] = (_ours("fused", "fp16", "cuda"),
                                      _ours("fused", "int4", "cuda"))


@dataclass
class DecodeRun:
    """One timed generation: the prefill (which yields the first token) and each decode
    step after it, wall-clock ms; the first row's tokens (to check variants agree)."""

    prefill_ms: float
    step_ms: list[float]
    tokens: list[int]


class Engine:
    """Base: per-position latency from one decode that grows the context to the last
    position (what gpt2onnx is measured with); the PyTorch and optimum engines use
    ``_position_ms_from_prefill``."""

    threads: int | None = None
    # Whether ``decode(..., sampled=True)`` samples with ``config.SAMPLING``.
    samples = False

    def decode(self, prompt: list[int], new_tokens: int, batch: int,
               sampled: bool = False) -> DecodeRun:
        raise NotImplementedError

    def position_ms(self, prompt: list[int], positions: list[int], window: int
                    ) -> dict[int, float]:
        """Median step latency over ``window`` steps starting at each context position
        (the number of tokens already in the cache when the step runs)."""
        new = max(positions) + window - len(prompt) + 1
        run = self.decode(prompt, new, 1)
        # decode step i runs with len(prompt) + i tokens in the cache
        return {p: statistics.median(run.step_ms[p - len(prompt):p - len(prompt) + window])
                for p in positions}

    def info(self) -> dict[str, Any]:
        return {"threads": self.threads}

    def _position_ms_from_prefill(self, prompt: list[int], positions: list[int], window: int
                                  ) -> dict[int, float]:
        """The same numbers, cheaper: prefill p tokens, then time ``window`` steps. A step
        at position p costs the same whether the p cached tokens came from a prefill or
        from p decode steps (the cache holds the same tensors); this spares the slow
        engines a 1,000-step loop per pass."""
        return {p: self.step_ms_at(prompt, p, window) for p in positions}

    def step_ms_at(self, prompt: list[int], position: int, window: int) -> float:
        """Median latency of ``window`` batch-1 decode steps after a prefill of
        ``position`` tokens (``prompt`` repeated to that length)."""
        text = (prompt * (position // len(prompt) + 1))[:position]
        return statistics.median(self.decode(text, window + 1, 1).step_ms)


class OursEngine(Engine):
    """gpt2onnx through its public API: ``Model.generator`` and ``generate_next_token``."""

    def __init__(self, folder: str, provider: str = "cpu") -> None:
        from gpt2onnx.runtime import Model

        self.model = Model(folder, provider=provider)
        opts = self.model.session.get_session_options()
        self.threads = opts.intra_op_num_threads or None

    samples = True

    def decode(self, prompt: list[int], new_tokens: int, batch: int,
               sampled: bool = False) -> DecodeRun:
        from gpt2onnx.bench.config import SAMPLING
        from gpt2onnx.runtime import GenerationParams

        params = GenerationParams(max_new_tokens=new_tokens, stop_on_eos=False,
                                  **(SAMPLING if sampled else {}))
        gen = self.model.generator([prompt] * batch, params)
        t0 = time.perf_counter()
        gen.generate_next_token()  # prefill
        prefill = (time.perf_counter() - t0) * 1e3
        steps = []
        while not gen.is_done():
            t0 = time.perf_counter()
            gen.generate_next_token()
            steps.append((time.perf_counter() - t0) * 1e3)
        row = gen.rows[0]
        assert row is not None
        return DecodeRun(prefill, steps, list(row.token_ids))

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"threads": self.threads, "onnxruntime": ort.__version__,
                "providers": self.model.session.get_providers()}


def _torch_info(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    return {"threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__}


class TorchLoopEngine(Engine):
    """The classic greedy loops over GPT2LMHeadModel: with past_key_values, or re-feeding
    the whole text every step (``cached=False``)."""

    def __init__(self, checkpoint: str, cached: bool) -> None:
        import inspect

        import torch
        from transformers import GPT2LMHeadModel

        self.torch = torch
        self.model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
        self.cached = cached
        self.threads = torch.get_num_threads()
        # transformers 5 renamed past_key_values to cache (the old name still works, loudly).
        params = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def _step(self, ids: Any, past: Any) -> tuple[Any, Any]:
        kwargs = {self.cache_kw: past} if past is not None else {}
        out = self.model(ids, use_cache=self.cached, **kwargs)
        cache = getattr(out, "cache", None) if self.cache_kw == "cache" else out.past_key_values
        return out.logits[:, -1].argmax(-1), cache  # [batch]

    def decode(self, prompt: list[int], new_tokens: int, batch: int) -> DecodeRun:
        torch = self.torch
        with torch.inference_mode():
            ids = torch.tensor([prompt] * batch)  # [batch, seq]
            t0 = time.perf_counter()
            nxt, past = self._step(ids, None)
            prefill = (time.perf_counter() - t0) * 1e3
            tokens, steps = [int(nxt[0])], []
            for _ in range(new_tokens - 1):
                t0 = time.perf_counter()
                if self.cached:
                    nxt, past = self._step(nxt[:, None], past)
                else:
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                    nxt, _ = self._step(ids, None)
                steps.append((time.perf_counter() - t0) * 1e3)
                tokens.append(int(nxt[0]))
        return DecodeRun(prefill, steps, tokens)

    def position_ms(self, prompt: list[int], positions: list[int], window: int
                    ) -> dict[int, float]:
        if self.cached:
            return self._position_ms_from_prefill(prompt, positions, window)
        # Uncached, the step at position p is one forward over the whole p + 1 token text:
        # time that directly (a full 1,000-step loop would take many minutes).
        torch = self.torch
        out: dict[int, float] = {}
        with torch.inference_mode():
            for p in positions:
                ids = torch.tensor([(prompt * (p // len(prompt) + 1))[:p + 1]])
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    self._step(ids, None)
                    times.append((time.perf_counter() - t0) * 1e3)
                out[p] = statistics.median(times)
        return out

    def info(self) -> dict[str, Any]:
        return _torch_info(self.threads or 0)


class _StepClock:
    """A ``generate`` streamer that timestamps each token: the first ``put`` is the prompt,
    each later one a new token (all rows at once)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.tokens: list[int] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) > 1:
            self.tokens.append(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


class GenerateEngine(Engine):
    """``model.generate`` greedy with a timing streamer: transformers' GPT2LMHeadModel, or
    optimum's ORTModelForCausalLM on optimum's own export (``optimum=True``)."""

    def __init__(self, folder: str, optimum: bool) -> None:
        import torch

        self.torch = torch
        if optimum:
            from optimum.onnxruntime import ORTModelForCausalLM

            self.model = ORTModelForCausalLM.from_pretrained(folder)
        else:
            from transformers import GPT2LMHeadModel

            self.model = GPT2LMHeadModel.from_pretrained(folder).eval()
        self.optimum = optimum
        self.threads = torch.get_num_threads()

    samples = True

    def decode(self, prompt: list[int], new_tokens: int, batch: int,
               sampled: bool = False) -> DecodeRun:
        from gpt2onnx.bench.config import SAMPLING

        torch = self.torch
        ids = torch.tensor([prompt] * batch)
        clock = _StepClock()
        how: dict[str, Any] = {"do_sample": False}
        if sampled:
            torch.manual_seed(SAMPLING["seed"])
            how = {"do_sample": True, "temperature": SAMPLING["temperature"],
                   "top_p": SAMPLING["top_p"], "top_k": 0}
        with torch.inference_mode():
            t0 = time.perf_counter()
            # min_new_tokens keeps a random-weight model from stopping early at EOS.
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                streamer=clock, pad_token_id=0, **how)
        stamps = clock.stamps  # [prompt, token 1 (after the prefill), token 2, ...]
        steps = [(b - a) * 1e3 for a, b in itertools.pairwise(stamps[1:])]
        return DecodeRun((stamps[1] - t0) * 1e3, steps, clock.tokens)

    def position_ms(self, prompt: list[int], positions: list[int], window: int
                    ) -> dict[int, float]:
        return self._position_ms_from_prefill(prompt, positions, window)

    def info(self) -> dict[str, Any]:
        info = _torch_info(self.threads or 0)
        if self.optimum:
            from importlib.metadata import version

            import onnxruntime as ort

            info.update(onnxruntime=ort.__version__, optimum=version("optimum"),
                        optimum_onnx=version("optimum-onnx"))
        return info


class GenaiEngine(Engine):
    """onnxruntime-genai's Generator (append_tokens, then generate_next_token per token),
    greedy, on a standard-layout folder. Runs in its venv: numpy and onnxruntime_genai."""

    def __init__(self, folder: str) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(folder)

    samples = True

    def decode(self, prompt: list[int], new_tokens: int, batch: int,
               sampled: bool = False) -> DecodeRun:
        import numpy as np

        from gpt2onnx.bench.config import SAMPLING

        og = self.og
        params = og.GeneratorParams(self.model)
        how: dict[str, Any] = {"do_sample": False}
        if sampled:
            how = {"do_sample": True, "temperature": SAMPLING["temperature"],
                   "top_p": SAMPLING["top_p"], "top_k": 0, "random_seed": SAMPLING["seed"]}
        params.set_search_options(max_length=len(prompt) + new_tokens, min_length=0,
                                  batch_size=batch, **how)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array([prompt] * batch, dtype=np.int32))  # runs the prompt
        gen.generate_next_token()  # picks the first token from the prompt's logits
        prefill = (time.perf_counter() - t0) * 1e3
        tokens, steps = [int(gen.get_next_tokens()[0])], []
        # Every step to max_length (a random-weight model may emit EOS; genai would stop).
        while len(tokens) < new_tokens and not gen.is_done():
            t0 = time.perf_counter()
            gen.generate_next_token()
            steps.append((time.perf_counter() - t0) * 1e3)
            tokens.append(int(gen.get_next_tokens()[0]))
        return DecodeRun(prefill, steps, tokens)

    def position_ms(self, prompt: list[int], positions: list[int], window: int
                    ) -> dict[int, float]:
        return self._position_ms_from_prefill(prompt, positions, window)

    def info(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"threads": None, "onnxruntime_genai": version("onnxruntime-genai"),
                "onnxruntime": version("onnxruntime")}


def make_engine(spec: dict[str, Any]) -> Engine:
    """Build the engine a worker's spec names (kind + the folder it loads)."""
    kind, folder = spec["kind"], spec["folder"]
    if kind == KIND_OURS:
        return OursEngine(folder, spec.get("provider", "cpu"))
    if kind in (KIND_TORCH_CACHED, KIND_TORCH_UNCACHED):
        return TorchLoopEngine(folder, cached=kind == KIND_TORCH_CACHED)
    if kind in (KIND_HF_GENERATE, KIND_OPTIMUM):
        return GenerateEngine(folder, optimum=kind == KIND_OPTIMUM)
    if kind == KIND_GENAI:
        return GenaiEngine(folder)
    if kind == KIND_LLAMACPP:
        from gpt2onnx.bench.peer_llamacpp import LlamaCppEngine

        return LlamaCppEngine(folder, spec.get("threads"))
    if kind == KIND_CT2:
        from gpt2onnx.bench.peer_ct2 import Ct2Engine

        return Ct2Engine(folder, spec.get("threads"))
    if kind == KIND_OPENVINO:
        from gpt2onnx.bench.peer_openvino import OpenvinoEngine

        return OpenvinoEngine(folder)
    raise ValueError(f"unknown variant kind {kind!r}")
