"""``export_model``: a Hugging Face GPT-2 checkpoint in, a validated model folder out."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2onnx import __version__
from gpt2onnx.contract import (
    LAYOUT_FUSED,
    LAYOUT_STANDARD,
    LAYOUTS,
    MIXED_GRAPH_FILE,
    PRECISIONS,
    REPORT_FILE,
    Manifest,
    fused_io,
    graph_props,
    standard_io,
)
from gpt2onnx.errors import InvalidParameterError, ValidationError
from gpt2onnx.export import destination
from gpt2onnx.export import folder as mf
from gpt2onnx.export.checkpoint import ModelSpec, load_model, weights_from_model
from gpt2onnx.export.genai_config import GENAI_CONFIG_FILE, genai_config
from gpt2onnx.export.tokenizer_check import load_tokenizer

DEFAULT_LAYOUT = LAYOUT_FUSED


@dataclass(frozen=True)
class ExportOptions:
    """What to build.

    Args:
        layout: "standard" (standard ops, any provider) or "fused" (in-place cache).
        precision: "fp32", "fp16", "int8" or "int4".
        provider: the provider the fused folder targets ("cpu" or "cuda").
        max_length: the fused cache's capacity in tokens (default: the model's n_positions).
        validate: compare with the PyTorch model; a miss fails the export.
        tokenizer: where to take the tokenizer from (default: SOURCE).
        mixed_graph: with a CPU fused folder, also write the mixed graph (the serving
            engine runs decode rows and prompt chunks in one run with it); the weights
            then live once in model.onnx.data, shared by both graphs.
        int4_block_size: int4 only: weights per quantization block, one of 16, 32, 64,
            128, 256 (default 32). Larger blocks decode and prefill faster and stray
            further from fp32 (bench history section 20).
    """

    layout: str = DEFAULT_LAYOUT
    precision: str = "fp32"
    provider: str = "cpu"
    max_length: int | None = None
    validate: bool = True
    tokenizer: str | None = None
    mixed_graph: bool = True
    int4_block_size: int | None = None

    def check(self, spec: ModelSpec | None = None) -> None:
        if self.layout not in LAYOUTS:
            raise InvalidParameterError("layout", f"layout must be one of {LAYOUTS}, got "
                                        f"{self.layout!r}.")
        if self.precision not in PRECISIONS:
            raise InvalidParameterError("precision", f"precision must be one of {PRECISIONS}, "
                                        f"got {self.precision!r}.")
        if self.provider not in ("cpu", "cuda"):
            raise InvalidParameterError("provider", f"provider must be 'cpu' or 'cuda', got "
                                        f"{self.provider!r}.")
        from gpt2onnx.export.precision import check_int4_block_size, check_pair

        if self.layout == LAYOUT_FUSED:
            check_pair(self.precision, self.provider)
        if self.layout == LAYOUT_STANDARD and self.precision != "fp32":
            raise InvalidParameterError(
                "precision", f"the standard layout is exported in fp32 only, got "
                f"{self.precision!r}; use --layout fused for fp16/int8/int4.")
        if self.max_length is not None:
            top = spec.n_positions if spec else None
            wrong_type = isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
            if wrong_type or self.max_length < 2 or (top is not None and self.max_length > top):
                raise InvalidParameterError(
                    "max_length", f"max_length must be in [2, {top or 'n_positions'}], got "
                    f"{self.max_length!r}; it cannot exceed the model's position table.")
        check_int4_block_size(self.int4_block_size, self.precision)

    @property
    def int4_block_used(self) -> int | None:
        """The int4 block size the export uses (None for other precisions)."""
        from gpt2onnx.export.precision import INT4_BLOCK_SIZE

        if self.precision != "int4":
            return None
        return self.int4_block_size or INT4_BLOCK_SIZE


class _Progress:
    """One progress bar over the export's stages (stderr; quiet when not a terminal)."""

    def __init__(self, stages: list[str]) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=len(stages), desc="export", unit="step", file=sys.stderr,
                        bar_format="{desc}: {n}/{total} {bar} {elapsed}",
                        disable=None)  # None: off when stderr is not a terminal
        self.t0 = time.perf_counter()

    def stage(self, name: str) -> None:
        self.bar.set_description(f"export: {name}")

    def done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _build(spec: ModelSpec, weights: Any, opts: ExportOptions, max_length: int) -> Any:
    if opts.layout == LAYOUT_STANDARD:
        from gpt2onnx.export.graph_standard import build_standard

        return build_standard(spec, weights)
    from gpt2onnx.export.graph_fused import build_fused
    from gpt2onnx.export.precision import apply_precision, quantize_embedding_table

    del max_length  # the fused graph is length-agnostic; the runtime sizes the buffers
    graph = build_fused(spec, weights, quantized_head=opts.precision in ("int8", "int4"),
                        skip_layer_norm=opts.provider == "cuda")
    if cache_dtype(opts) == "float16":
        graph = apply_precision(graph, "fp16")
    if opts.precision in ("int8", "int4"):
        graph = apply_precision(graph, opts.precision, opts.int4_block_used)
        if opts.provider == "cpu":
            # Not on CUDA: no GPU was at hand to check GatherBlockQuantized's kernel there.
            graph = quantize_embedding_table(graph)
    return graph


def _mixed_maker(manifest: Manifest, opts: ExportOptions) -> Any:
    """For CPU fused folders, what makes the mixed graph (decode rows and a prompt chunk
    in one run; see graph_mixed.py), recorded in the manifest. On CUDA it is not written:
    no GPU was at hand to check its in-place lanes."""
    if opts.layout != LAYOUT_FUSED or opts.provider != "cpu" or not opts.mixed_graph:
        return None
    from gpt2onnx.export.graph_mixed import mixed_graph

    manifest.mixed_graph_file = MIXED_GRAPH_FILE
    m = manifest
    return lambda model: mixed_graph(model, m.n_layer, m.n_head, m.head_dim, m.vocab_size,
                                     m.cache_dtype)


def cache_dtype(opts: ExportOptions) -> str:
    """fp16 graphs and CUDA int4 graphs (fp16 activations) keep an fp16 cache."""
    half = opts.precision == "fp16" or (opts.precision == "int4" and opts.provider == "cuda")
    return "float16" if half else "float32"


def export_model(source: str | Path, out_dir: str | Path,
                 options: ExportOptions | None = None) -> dict[str, Any]:
    """Export ``source`` (a local checkpoint folder or hub id) into ``out_dir``.

    Returns the export report (also written as export_report.json).

    A symlinked ``out_dir`` is written through (its target receives the export).

    Raises:
        ModelFolderError: bad source, a tokenizer that does not fit the model, or an
            ``out_dir`` that is not provably an earlier export (it is never touched).
        UnsupportedConfigError, InvalidParameterError: bad config or options.
        ValidationError: the graph does not match PyTorch; nothing is left in ``out_dir``.
    """
    opts = options or ExportOptions()
    opts.check()
    # Checked before the (slow) load, so a bad OUT_DIR fails in a second.
    out = destination.resolve_destination(out_dir, source)
    progress = _Progress(["load", "build", "save", "validate", "publish"])
    try:
        progress.stage("loading checkpoint")
        torch_model, spec = load_model(source)
        opts.check(spec)
        tokenizer = load_tokenizer(opts.tokenizer or str(source), spec,
                                   explicit=opts.tokenizer is not None)
        progress.done()

        progress.stage(f"building {opts.layout} {opts.precision} graph")
        max_length = opts.max_length or spec.n_positions
        graph = _build(spec, weights_from_model(torch_model), opts, max_length)
        manifest = _manifest(spec, opts, max_length, str(source))
        _stamp(graph, manifest)
        progress.done()

        with destination.staging_folder(out) as tmp:
            progress.stage("saving")
            # Not on CUDA: there each range would be one more device copy of the table.
            files = mf.save_graph(graph, tmp, _mixed_maker(manifest, opts),
                                  split_head=opts.provider == "cpu"
                                  and opts.layout == LAYOUT_FUSED)
            files += mf.save_tokenizer(tokenizer, tmp)
            del graph
            files += _save_generation_config(torch_model, tmp)
            files += _save_genai_config(manifest, tmp)
            manifest.files = mf.hash_files(tmp, files)
            manifest.save(tmp)
            progress.done()

            report: dict[str, Any] = {
                "source": str(source), "exporter_version": __version__,
                "layout": opts.layout, "precision": opts.precision, "provider": opts.provider,
                **({"int4_block_size": opts.int4_block_used} if opts.int4_block_used else {}),
                "validation": None,
            }
            if opts.validate:
                progress.stage("validating against PyTorch")
                from gpt2onnx.export.validate import validate_folder, validation_provider

                run_on, why = validation_provider(opts.provider if opts.layout == LAYOUT_FUSED
                                                  else "cpu")
                result = validate_folder(tmp, torch_model, opts.precision, provider=run_on,
                                         validated_on=why)
                report["validation"] = result.to_dict()
                progress.done()
                progress.close()
                print(f"validation ({opts.layout} {opts.precision}, on {why}) against "
                      f"transformers GPT2LMHeadModel:\n{result.summary()}", file=sys.stderr)
                if not result.passed:
                    raise ValidationError(
                        f"validation failed for {opts.layout} {opts.precision}; nothing was "
                        f"written to {out_dir}.{_tokenizer_hint(result)}\n{result.summary()}")
            else:
                progress.done()
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
            progress.stage("publishing")
            destination.publish(tmp, out)
            progress.done()
    finally:
        progress.close()
    return report


def _tokenizer_hint(result: Any) -> str:
    from gpt2onnx.export.validate import TOKENIZER_CHECK

    if any(c.name == TOKENIZER_CHECK and not c.passed for c in result.checks):
        return (" The folder's tokenizer does not round-trip text within the model's "
                "vocabulary: pass --tokenizer with the tokenizer this model was trained with.")
    return ""


def _stamp(graph: Any, manifest: Manifest) -> None:
    """Write the manifest's shape facts into the graph's metadata_props, so the runtime
    can refuse a manifest edited to disagree with the graph it describes."""
    import onnx

    props = {p.key: p.value for p in graph.metadata_props} | graph_props(manifest)
    onnx.helper.set_model_props(graph, props)


def _save_genai_config(manifest: Manifest, folder: Path) -> list[str]:
    """Standard layout: the genai_config.json that lets onnxruntime-genai run the folder."""
    config = genai_config(manifest)
    if config is None:
        return []
    (folder / GENAI_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return [GENAI_CONFIG_FILE]


def _save_generation_config(torch_model: Any, folder: Path) -> list[str]:
    config = getattr(torch_model, "generation_config", None)
    if config is None:
        return []
    config.save_pretrained(str(folder))
    return ["generation_config.json"]


def _manifest(spec: ModelSpec, opts: ExportOptions, max_length: int, source: str) -> Manifest:
    io = fused_io if opts.layout == LAYOUT_FUSED else standard_io
    inputs, outputs = io(spec.n_layer, spec.n_head, spec.head_dim, spec.vocab_size,
                         cache_dtype(opts))
    return Manifest(
        layout=opts.layout, precision=opts.precision,
        provider=opts.provider if opts.layout == LAYOUT_FUSED else "any",
        n_layer=spec.n_layer, n_head=spec.n_head, head_dim=spec.head_dim, n_embd=spec.n_embd,
        vocab_size=spec.vocab_size, context_length=spec.n_positions,
        bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id, cache_dtype=cache_dtype(opts),
        inputs=[s.name for s in inputs], outputs=[s.name for s in outputs],
        opset=17, source=source, exporter_version=__version__,
        max_length=max_length if opts.layout == LAYOUT_FUSED else None,
    )
