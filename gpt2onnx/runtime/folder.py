"""Open a model folder: our own (manifest.json) or one exported by optimum-cli.

The runtime learns everything from here; nothing about a model is guessed later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gpt2onnx.contract import (
    ATTENTION_MASK,
    FORMAT_VERSION,
    GRAPH_FILE,
    INPUT_IDS,
    LAYOUT_FUSED,
    LAYOUT_STANDARD,
    LOGITS,
    LOGITS_INDEX,
    MANIFEST_FILE,
    POSITION_IDS,
    PROP_CONTEXT_LENGTH,
    SEQLENS_K,
    TOKENIZER_FILE,
    TOTAL_SEQUENCE_LENGTH,
    Manifest,
    cache_names,
    graph_props,
    mixed_io,
    read_small_json,
    sha256_file,
)
from gpt2onnx.errors import InvalidParameterError, ModelFolderError, ProviderUnavailableError
from gpt2onnx.manifest_schema import (
    MAX_CONTEXT,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_VOCAB,
    Schema,
    parse_manifest,
)
from gpt2onnx.runtime.verified import VerifiedFiles, stamp

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
SPIN_ENV = "GPT2ONNX_SPIN"
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def open_manifest(folder: str | Path, verify: bool | str = True) -> Manifest:
    """Read (or, for an optimum folder, derive) the manifest and check the files.

    Args:
        folder: the model folder.
        verify: True: check each file's sha256 against the manifest (catches truncated
            and corrupt copies), skipping files whose stat stamp is unchanged since they
            last matched (``gpt2onnx.runtime.verified``); "full": hash every file every
            time; False: only check that the files exist.

    Raises:
        InvalidParameterError: ``verify`` is none of True, False, "full".
        ModelFolderError: missing folder, missing or corrupt file, unreadable manifest.
    """
    if not (verify is True or verify is False or verify == "full"):
        raise InvalidParameterError("verify", f"verify must be True, False or 'full', got "
                                    f"{verify!r}.")
    path = Path(folder)
    if not path.is_dir():
        raise ModelFolderError(
            f"model folder {str(path)!r} does not exist or is not a folder. Export one with "
            "`python -m gpt2onnx.export SOURCE OUT_DIR` (or `make export`).")
    if (path / MANIFEST_FILE).exists() or (path / MANIFEST_FILE).is_symlink():
        manifest = Manifest.load(path)
        where = path / MANIFEST_FILE
        for rel in (manifest.graph_file, manifest.tokenizer_file, manifest.mixed_graph_file):
            if rel is not None and rel not in manifest.files:
                raise ModelFolderError(f"{where} lists no hash for {rel}; re-export the folder.")
        # Every path is confined to the folder before any file is opened or hashed, so a
        # manifest cannot make the runtime read (or reveal the existence of) other files.
        files = {inside_folder(path, rel, where): digest
                 for rel, digest in manifest.files.items()}
        _check_hashes(files, verify)
        return manifest
    if (path / GRAPH_FILE).exists() and (path / "config.json").exists():
        return _manifest_from_optimum(path)
    raise ModelFolderError(
        f"{path} has neither manifest.json (a gpt2onnx folder) nor model.onnx + config.json "
        "(an optimum folder). Export one with `python -m gpt2onnx.export SOURCE OUT_DIR`.")


def inside_folder(folder: Path, rel: str, where: Path | str) -> Path:
    """``folder / rel`` if it resolves (symlinks followed) to a regular file inside
    ``folder``, else ModelFolderError naming ``rel`` and the fix. Only stats, never opens."""
    file = folder / rel
    try:
        real = file.resolve()
        outside = not real.is_relative_to(folder.resolve())
        regular = not outside and real.is_file()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ModelFolderError(f"{where}: {rel!r} cannot be resolved ({exc}); re-export the "
                               "folder.") from exc
    if outside:
        raise ModelFolderError(
            f"{where}: {rel!r} resolves to {real}, outside the model folder {folder} (a "
            "symlink out of it); copy the real file into the folder or re-export it.")
    if not regular:
        raise ModelFolderError(f"{file} is missing from the model folder (or is not a "
                               "regular file); re-export it or copy the whole folder again.")
    return file


def _check_hashes(files: dict[Path, str], verify: bool | str) -> None:
    seen = VerifiedFiles() if verify is True else None
    for file, digest in files.items():
        if not verify or (seen is not None and seen.unchanged(file, digest)):
            continue
        try:
            before = stamp(file)
            actual = sha256_file(file)
        except OSError as exc:
            raise ModelFolderError(f"{file} could not be read ({exc}); check the folder's "
                                   "permissions or copy it again.") from exc
        if actual != digest:
            raise ModelFolderError(
                f"{file} does not match the sha256 in manifest.json (corrupt or partial "
                "copy); copy the folder again or re-export it.")
        if seen is not None:
            seen.record(file, digest, before)
    if seen is not None:
        seen.save()


def check_tokenizer_fits(tokenizer: Any, manifest: Manifest, path: Path) -> None:
    """Refuse a tokenizer (a ``tokenizers.Tokenizer``) with ids the model has no logits
    for: a mismatched tokenizer would otherwise fail later, prompt by prompt, with
    out-of-vocabulary ids."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > manifest.vocab_size:
        raise ModelFolderError(
            f"{path} has {size} tokens, but the model's vocab_size is {manifest.vocab_size}: "
            "it is another model's tokenizer. Re-export the folder with the checkpoint's own "
            "tokenizer (`--tokenizer` naming the one it was trained with).")
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = getattr(manifest, field)
        if token is not None and tokenizer.id_to_token(token) is None:
            raise ModelFolderError(
                f"{path} has no token for the manifest's {field} {token} (its ids stop at "
                f"{size - 1}): it is another model's tokenizer. Re-export the folder with the "
                "checkpoint's own tokenizer (`--tokenizer` naming the one it was trained with).")


OPTIMUM_FIX = ("export the folder again with `optimum-cli export onnx --task "
               "text-generation-with-past` or with `python -m gpt2onnx.export`")


def _manifest_from_optimum(path: Path) -> Manifest:
    """An `optimum-cli export onnx --task text-generation-with-past` folder: same IO names,
    standard layout; its config.json supplies the shapes, checked by the manifest's schema."""
    where = path / "config.json"
    config = read_small_json(where, path)
    if not isinstance(config, dict):
        raise ModelFolderError(f"{where} must hold a JSON object (a GPT-2 config), got "
                               f"{type(config).__name__}; {OPTIMUM_FIX}.")
    schema = Schema(config, str(where), OPTIMUM_FIX)
    n_layer = schema.integer("n_layer", 1, MAX_LAYERS)
    n_head = schema.integer("n_head", 1, MAX_HEADS)
    n_embd = schema.integer("n_embd", n_head, MAX_HEADS * MAX_HEAD_DIM)
    if n_embd % n_head:
        raise schema.fail("n_embd", f"a multiple of n_head ({n_head})")
    vocab = schema.integer("vocab_size", 2, MAX_VOCAB)
    context = schema.integer("n_positions", 2, MAX_CONTEXT)
    inside_folder(path, GRAPH_FILE, where)
    if not (path / TOKENIZER_FILE).exists():
        raise ModelFolderError(f"{path} has no {TOKENIZER_FILE}; the runtime needs it.")
    inside_folder(path, TOKENIZER_FILE, where)
    eos = config.get("eos_token_id")
    names = [n for pair in cache_names(n_layer) for n in pair]
    data = dict(
        format_version=FORMAT_VERSION, layout=LAYOUT_STANDARD, precision="fp32",
        provider="any", n_layer=n_layer, n_head=n_head, head_dim=n_embd // n_head,
        n_embd=n_embd, vocab_size=vocab, context_length=context,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
        pad_token_id=config.get("pad_token_id"), cache_dtype="float32",
        inputs=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *names[0::2]],
        outputs=[LOGITS, *names[1::2]], source=f"optimum folder {path}",
    )
    # The same schema as manifest.json: n_positions, the token ids and their ranges
    # (an optimum folder has no hashes to check).
    return parse_manifest(data, str(where), OPTIMUM_FIX, hashed=False)


def make_session(folder: str | Path, manifest: Manifest, provider: str = "cpu",
                 threads: int | None = None, cuda_graph: bool = False,
                 profile: bool = False, spinning: bool | str | None = None,
                 target_check: bool = True, mixed: bool = False) -> ort.InferenceSession:
    """An InferenceSession for the folder's graph on one provider, checked against the manifest.
    ``mixed``: its mixed graph instead (``Manifest.mixed_graph_file``, CPU only).

    Raises:
        ProviderUnavailableError: ``provider`` unknown or not in this onnxruntime build.
        ModelFolderError: the graph's inputs/outputs differ from the manifest's.
    """
    if provider not in PROVIDERS:
        raise ProviderUnavailableError(
            f"provider {provider!r} is not one of {sorted(PROVIDERS)}; pass --provider cpu "
            "or cuda.")
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise ProviderUnavailableError(
            f"provider {provider!r} needs {PROVIDERS[provider]}, which this onnxruntime build "
            f"lacks (it has {available}). Install the GPU build: `pip uninstall onnxruntime && "
            "pip install 'gpt2onnx[gpu]'` (onnxruntime-gpu replaces onnxruntime).")
    if target_check and manifest.provider not in ("any", provider):
        raise ProviderUnavailableError(
            f"this folder was exported for the {manifest.provider!r} provider "
            f"(precision {manifest.precision}, layout {manifest.layout}); export another with "
            f"`--provider {provider}` or run it with provider={manifest.provider!r}.")
    opts = session_options(threads, spinning)
    if profile:
        opts.enable_profiling = True
    provider_options: dict[str, str] = {}
    if provider == "cuda":
        # A node without a CUDA kernel must be an error, never a silent CPU copy per step.
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if cuda_graph:
            provider_options["enable_cuda_graph"] = "1"
    graph = Path(folder) / manifest.graph_file
    expected = manifest.inputs, manifest.outputs
    if mixed:
        if manifest.mixed_graph_file is None or provider != "cpu":
            raise InvalidParameterError(
                "mixed", f"mixed runs need a CPU fused folder with a mixed graph; "
                f"{folder} has {manifest.mixed_graph_file or 'none'} (provider {provider}): "
                "re-export it with this version of gpt2onnx, or load it with mixed=False.")
        graph = Path(folder) / manifest.mixed_graph_file
        ins, outs = mixed_io(manifest.n_layer, manifest.n_head, manifest.head_dim,
                             manifest.vocab_size, manifest.cache_dtype)
        expected = [t.name for t in ins], [t.name for t in outs]
    _fix_mmap_threshold()
    try:
        session = ort.InferenceSession(str(graph), sess_options=opts,
                                       providers=[(PROVIDERS[provider], provider_options)])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelFolderError(f"onnxruntime cannot load {graph}: {exc}") from exc
    _check_io(graph, manifest, session, *expected)
    _check_shapes(graph, manifest, session, probe=not cuda_graph)
    return session


def _check_shapes(graph: Path, manifest: Manifest, session: ort.InferenceSession,
                  probe: bool) -> None:
    """Refuse a manifest whose sizes disagree with the graph: the shape facts the exporter
    wrote into the graph's metadata (``contract.graph_props``), the logits' static vocab
    dimension, and, for graphs without that metadata (older exports, optimum folders), a
    one-token run at position context_length - 1, so that a context longer than the
    position table is refused here rather than failing inside onnxruntime mid-generation.
    """
    stored = session.get_modelmeta().custom_metadata_map
    for key, expected in graph_props(manifest).items():
        if key in stored and stored[key] != expected:
            raise ModelFolderError(
                f"{graph} was exported with {key} = {stored[key]}, but manifest.json says "
                f"{expected}; the manifest was edited or belongs to another export: "
                "re-export the folder.")
    logits = next(o for o in session.get_outputs() if o.name == LOGITS)
    vocab = logits.shape[-1] if logits.shape else None
    if isinstance(vocab, int) and vocab != manifest.vocab_size:
        raise ModelFolderError(
            f"{graph} returns logits over {vocab} tokens, but manifest.json says vocab_size "
            f"{manifest.vocab_size}; re-export the folder.")
    if probe and PROP_CONTEXT_LENGTH not in stored:
        _probe_last_position(graph, manifest, session)


def _probe_last_position(graph: Path, manifest: Manifest,
                         session: ort.InferenceSession) -> None:
    """Run one token at position context_length - 1 (an empty or one-token cache: cheap);
    an onnxruntime error means the position table is shorter than the manifest claims."""
    names = {i.name for i in session.get_inputs()}
    if POSITION_IDS not in names:
        return  # positions come from the mask inside the graph: probing would need a full cache
    m = manifest
    last = np.array([[m.context_length - 1]], np.int64)
    token = np.zeros((1, 1), np.int64)
    dtype = np.float16 if m.cache_dtype == "float16" else np.float32
    if m.layout == LAYOUT_FUSED:
        # The fused cache is one buffer per layer: a single empty slot of length 1.
        feeds = {INPUT_IDS: token, POSITION_IDS: last, SEQLENS_K: np.zeros(1, np.int32),
                 TOTAL_SEQUENCE_LENGTH: np.array(1, np.int32)}
        if LOGITS_INDEX in names:
            feeds[LOGITS_INDEX] = np.zeros((1, 1), np.int64)
        past_len = 1
    else:
        feeds = {INPUT_IDS: token, ATTENTION_MASK: np.ones((1, 1), np.int64),
                 POSITION_IDS: last}
        past_len = 0
    for past, _ in cache_names(m.n_layer):
        feeds[past] = np.zeros((1, m.n_head, past_len, m.head_dim), dtype)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the expected failure is reported below, not logged
    try:
        session.run([LOGITS], feeds, quiet)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        optimum = m.source.startswith("optimum")
        said = ("config.json says n_positions" if optimum else "manifest.json says "
                "context_length")
        sizes = f"n_layer {m.n_layer}, n_head {m.n_head}, n_embd {m.n_embd}"
        fix = "Fix config.json or export the folder again" if optimum else "Re-export the folder"
        raise ModelFolderError(
            f"{graph} fails a one-token run at position {m.context_length - 1} ({said} "
            f"{m.context_length}; {sizes}): either its position table is shorter or those "
            f"sizes are not the graph's: {_first_line(exc)}. "
            f"{fix}."
        ) from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def _fix_mmap_threshold() -> None:
    """Have glibc serve allocations >= 1 MiB with mmap, so that freeing them returns the
    memory to the OS.

    Loading a graph frees hundreds of MB of protobuf buffers while the weights are copied
    and prepacked. glibc's default mmap threshold adapts upwards after such frees, after
    which multi-MB weight tensors come from the heap and the freed buffers stay resident:
    about half of the gpt2 fp32 loads on the bench machine then peaked at 910 MB instead of
    700 MB. Decode allocates from onnxruntime's arena, not malloc, so steps do not pay for
    this. Skipped where the user set MALLOC_MMAP_THRESHOLD_ or libc is not glibc.
    """
    global _MMAP_THRESHOLD
    if not _MMAP_THRESHOLD or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    threshold, _MMAP_THRESHOLD = _MMAP_THRESHOLD, 0  # once per process
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
SPIN_RUN = "run"  # spin within a run, sleep at its end (onnxruntime's force_spinning_stop)


def spin_from_env() -> bool | str:
    """GPT2ONNX_SPIN: unset means on; 1/true/yes/on, 0/false/no/off, or "run" (spin
    within a run, sleep at its end: see ``session_options``)."""
    value = os.environ.get(SPIN_ENV)
    if value is None:
        return True
    return parse_spinning(value, f"{SPIN_ENV}={value!r}", SPIN_ENV,
                          "set it to 0 to turn intra-op spinning off, or unset it")


def parse_spinning(text: str, what: str, param: str, fix: str) -> bool | str:
    """A spinning setting written as text (an environment variable, a Serve config
    file's value): 1/true/yes/on, 0/false/no/off or "run"; ``what`` names it in the
    error, ``fix`` says what to do instead."""
    word = text.strip().lower()
    if word in _ON:
        return True
    if word in _OFF:
        return False
    if word == SPIN_RUN:
        return SPIN_RUN
    raise InvalidParameterError(param, f"{what} is not one of {'/'.join(_ON)}, "
                                f"{'/'.join(_OFF)} or {SPIN_RUN}; {fix}.")


def session_options(threads: int | None = None, spinning: bool | str | None = None
                    ) -> ort.SessionOptions:
    """The session options of every gpt2onnx session (and of the bench's GEMV floor, so
    that the floor is measured under the same settings).

    Args:
        threads: intra-op threads (default: onnxruntime's choice, one per physical core).
        spinning: let idle intra-op threads busy-wait for the next kernel (default: on,
            onnxruntime's own default, unless the environment sets GPT2ONNX_SPIN=0).
            Measured both ways (bench/results/history.md, sections 1 and 5): on a machine
            with its cores to itself, spinning made decode 1.07x (fp32) to 1.32x (int8)
            faster, since a woken thread costs tens of microseconds at each of the ~100
            parallel kernels of a step; on a CPU oversubscribed by other processes (load
            4-5 on 2 cores) it made decode 1.7x slower, because the spinning thread holds
            the core the next kernel's other half needs. Turn it off on shared machines
            and under CPU quotas (a spinning thread burns quota while it waits).
            ``"run"``: spin within a run, stop at its end. For two sessions that take
            turns on the same cores (speculative decoding's target and draft): with both
            spinning fully, each holds the cores the other needs; with both on "run", an
            fp32 target with an int8 draft decoded at 6.5-7 ms/token against 8.9-9.2 with
            the draft's threads asleep (plain: 14-15.5). Alone, "run" costs the next run
            its wake-up: int8 batch-1 decode 1.15x slower, fp32 1.01x.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if spinning is None:
        spinning = spin_from_env()
    if isinstance(spinning, str) and spinning != SPIN_RUN:
        raise InvalidParameterError("spinning", f"spinning must be True, False or "
                                    f"{SPIN_RUN!r}, got {spinning!r}.")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning == SPIN_RUN:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def _check_io(graph: Path, manifest: Manifest, session: ort.InferenceSession,
              inputs: list[str], outputs: list[str]) -> None:
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if manifest.source.startswith("optimum") and POSITION_IDS not in got_in:
        # Older optimum exports of gpt2 derive positions from the mask inside the graph.
        manifest.inputs.remove(POSITION_IDS)
    missing_in = [n for n in inputs if n not in got_in]
    extra_in = [n for n in got_in if n not in inputs]
    missing_out = [n for n in outputs if n not in got_out]
    if missing_in or extra_in or missing_out:
        raise ModelFolderError(
            f"{graph} does not match manifest.json: inputs missing {missing_in}, unexpected "
            f"inputs {extra_in}, outputs missing {missing_out}. Re-export the folder.")
    for i in session.get_inputs():
        if i.name.startswith("past_key_values.") and _ORT_TYPES.get(i.type) != manifest.cache_dtype:
            raise ModelFolderError(
                f"{graph}: input {i.name} is {i.type}, manifest.json says cache_dtype "
                f"{manifest.cache_dtype}. Re-export the folder.")


def session_device(provider: str) -> tuple[str, int]:
    """(device_type, device_id) where the session's buffers live."""
    return ("cuda", 0) if provider == "cuda" else ("cpu", 0)
