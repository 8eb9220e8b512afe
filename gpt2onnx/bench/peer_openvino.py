"""OpenVINO GenAI as a bench peer: optimum-intel's IR of the checkpoint (fp32, int8 or
int4 weights), decoded greedily by OpenVINO GenAI's pipeline in the OpenVINO venv
(``make bench-openvino-setup``).

Standard library (and variants.py, itself light) only at the top: the parent (our venv)
imports ``openvino_folder`` without OpenVINO, and the worker in the OpenVINO venv imports
``OpenvinoEngine`` with nothing of gpt2onnx installed (PYTHONPATH points at the checkout).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gpt2onnx.bench.variants import DecodeRun, Engine

# Written into the IR folder: the precision the engine runs it at (the worker's spec names
# only the folder). The folders are the speculative bench's (openvino-<ckpt>-<weights>).
MARKER = "gpt2onnx-peer.json"
PRECISIONS = ("fp32", "int8", "int4")
# What the engine asks the CPU plugin for, per precision. fp32 means fp32 end to end:
# on an AVX-512-BF16 host the plugin's default for an f32 IR is bf16 compute and an f16
# KV cache, whose greedy tokens need not be transformers'. int8 and int4 run at
# OpenVINO's defaults (bf16 compute here, a u8 cache), as a user of those IRs gets them;
# info() records what the plugin picked.
HINTS: dict[str, dict[str, str]] = {
    "fp32": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"},
    "int8": {}, "int4": {}}
REPORTED = ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "INFERENCE_NUM_THREADS")


def openvino_folder(cache: Path, ckpt: Path, precision: str, python: Path) -> Path:
    """``optimum-cli export openvino --weight-format PRECISION`` of ``ckpt`` (run in the
    OpenVINO venv, ``python``), once; cached under ``cache``. int4 needs hidden sizes
    divisible by its group size (128): gpt2's 768 is, the tests' tiny 64 is not."""
    from gpt2onnx.bench.openvino_speculative import export_ir

    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision {precision!r}: use one of "
                         f"{', '.join(PRECISIONS)}")
    out = export_ir(python, ckpt, cache / f"openvino-{ckpt.name}-{precision}", precision)
    if not (out / MARKER).exists():
        (out / MARKER).write_text(json.dumps({"precision": precision}) + "\n")
    return out


def _name(value: Any) -> str:
    """An element type by its short name (f32, bf16, u8), anything else as text."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


class OpenvinoEngine(Engine):
    """OpenVINO GenAI's continuous-batching pipeline on CPU, greedy, token ids in and out;
    a batch is that many requests of the prompt, decoded together.

    ``LLMPipeline`` on CPU is this same pipeline behind an adapter (its default attention
    backend is paged attention), but it times nothing per step for a batch: its streamer
    takes batch 1 only, and its perf metrics' ``m_new_token_times`` come back all but
    equal (stamped as tokens are read, after the run). Driving ``step()`` from here times
    every step of every batch size on the wall clock, as the other engines' loops are
    timed; the first step runs the prompts and samples the first token (the prefill).
    """

    samples = True

    def __init__(self, folder: str) -> None:
        marker = Path(folder) / MARKER
        if not marker.exists():
            raise ValueError(f"{folder} is not a bench OpenVINO folder (no {MARKER}); "
                             "make it with peer_openvino.openvino_folder")
        import openvino_genai as og

        self.og = og
        self.folder = folder
        self.precision: str = json.loads(marker.read_text())["precision"]
        self.hints = HINTS[self.precision]
        sched = og.SchedulerConfig()
        # LLMPipeline's default scheduler caches prompt prefixes: the bench decodes the
        # same prompt again and again, so every prefill after the first would be skipped
        # (gpt2, a 256-token prompt: 30 ms instead of 315). Off (also this class's
        # default, set for the record), as every other engine recomputes its prompt.
        sched.enable_prefix_caching = False
        # One step may take every prompt token of a batch (the default, 256, would split
        # a large batch's prefill over several steps).
        sched.max_num_batched_tokens = 1 << 31
        self.pipe = og.ContinuousBatchingPipeline(folder, sched, "CPU", self.hints)
        self._next_id = 0
        self._reported: dict[str, str] | None = None

    def decode(self, prompt: list[int], new_tokens: int, batch: int,
               sampled: bool = False) -> DecodeRun:
        """Greedy, or ``sampled`` with ``config.SAMPLING`` (seeded)."""
        import numpy as np
        import openvino as ov

        from gpt2onnx.bench.config import SAMPLING

        config = self.og.GenerationConfig()
        config.max_new_tokens = new_tokens
        config.do_sample = sampled
        if sampled:
            config.temperature = SAMPLING["temperature"]
            config.top_p = SAMPLING["top_p"]
            config.rng_seed = SAMPLING["seed"]
        # Every step, EOS or not, and EOS not masked (min_new_tokens would mask it): a
        # random-weight model's greedy tokens stay transformers'.
        config.ignore_eos = True
        ids = ov.Tensor(np.array([prompt], dtype=np.int64))
        handles = []
        for _ in range(batch):
            handles.append(self.pipe.add_request(self._next_id, ids, config))
            self._next_id += 1
        times = []
        while self.pipe.has_non_finished_requests():
            t0 = time.perf_counter()
            self.pipe.step()
            times.append((time.perf_counter() - t0) * 1e3)
        tokens = [int(t) for t in handles[0].read_all()[0].generated_ids]
        if len(times) != new_tokens or len(tokens) != new_tokens:
            raise RuntimeError(f"OpenVINO ran {len(times)} steps for {len(tokens)} tokens, "
                               f"asked for {new_tokens}")
        return DecodeRun(times[0], times[1:], tokens)

    def position_ms(self, prompt: list[int], positions: list[int], window: int
                    ) -> dict[int, float]:
        return self._position_ms_from_prefill(prompt, positions, window)

    def _plugin_choice(self) -> dict[str, str]:
        """The CPU plugin's own precision and thread choices for this IR with the same
        properties (the pipeline does not expose its compiled model): a second compile,
        done once, after load (so load time and the cold runs' RSS leave it out)."""
        if self._reported is None:
            import openvino as ov

            compiled = ov.Core().compile_model(str(Path(self.folder) / "openvino_model.xml"),
                                               "CPU", self.hints)
            self._reported = {k: _name(compiled.get_property(k)) for k in REPORTED}
        return self._reported

    def info(self) -> dict[str, Any]:
        from importlib.metadata import version

        used = self._plugin_choice()
        threads = used.get("INFERENCE_NUM_THREADS")
        return {"threads": int(threads) if threads and threads.isdigit() else None,
                "openvino_genai": version("openvino-genai"),
                "openvino": version("openvino"), "precision": self.precision,
                "hints_asked": self.hints or "OpenVINO defaults", "hints_used": used,
                "prefix_caching": False}
