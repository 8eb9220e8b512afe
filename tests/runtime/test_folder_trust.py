"""A model folder the runtime can trust: a tampered manifest is a typed ModelFolderError
naming the field (never a traceback, never a huge allocation), no path in it reads outside
the folder, the manifest must agree with the graph, and what held up before still holds
(hash checks, onnxruntime's own refusal of external data outside the folder)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2onnx.contract import MANIFEST_FILE, graph_props, sha256_file
from gpt2onnx.errors import InvalidParameterError, ModelFolderError
from gpt2onnx.runtime import Model
from gpt2onnx.runtime.verified import cache_dir

DELETE = object()  # an edit that removes the key


def _copy(src: Path, dst: Path) -> Path:
    """A copy whose big files are hard links (cheap; the verified-files record still sees
    their stamps), and whose manifest is a real copy, since tests rewrite it."""
    def link_or_copy(a: str, b: str) -> None:
        if Path(a).name == MANIFEST_FILE:
            shutil.copy2(a, b)
        else:
            os.link(a, b)

    return Path(shutil.copytree(src, dst, copy_function=link_or_copy))


def _edit(folder: Path, **edits: Any) -> Path:
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text())
    for key, value in edits.items():
        if value is DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return folder


@pytest.fixture
def standard(tiny_standard: Path, tmp_path: Path) -> Path:
    return _copy(tiny_standard, tmp_path / "standard")


@pytest.fixture
def fused(tiny_fused: Path, tmp_path: Path) -> Path:
    return _copy(tiny_fused, tmp_path / "fused")


def _refused(folder: Path, *words: str) -> str:
    with pytest.raises(ModelFolderError) as info:
        Model(folder)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), message
    return message


# --- the schema -------------------------------------------------------------------------

FIELD_CASES = [
    ("n_layer", 3), ("n_layer", -1), ("n_layer", 0), ("n_layer", "2"), ("n_layer", None),
    ("n_layer", True), ("n_layer", 2.0), ("n_layer", 10**9), ("n_head", 0), ("n_head", "4"),
    ("head_dim", -16), ("head_dim", None), ("n_embd", 65), ("vocab_size", -1),
    ("vocab_size", "50257"), ("vocab_size", 1 << 40), ("context_length", 1),
    ("context_length", None), ("context_length", 1 << 40), ("max_length", 10**15),
    ("max_length", 1), ("bos_token_id", 50257), ("eos_token_id", -1), ("pad_token_id", "0"),
    ("pad_token_id", True), ("layout", "sideways"), ("layout", None), ("precision", "fp64"),
    ("provider", "tpu"), ("cache_dtype", "float64"), ("inputs", []), ("inputs", None),
    ("outputs", ["logits"]), ("files", None), ("files", []), ("files", {}),
    ("files", {"model.onnx": "abc"}), ("format_version", 3), ("format_version", "2"),
    ("format_version", True), ("graph_file", 7), ("tokenizer_file", None),
    ("source", 5), ("opset", "17"),
]


@pytest.mark.parametrize(("field", "value"), FIELD_CASES)
def test_a_bad_field_is_named(standard: Path, field: str, value: Any) -> None:
    message = _refused(_edit(standard, **{field: value}), field, "re-export")
    if not isinstance(value, (dict, list)):
        assert repr(value) in message  # the value it found


@pytest.mark.parametrize("field", ["n_layer", "vocab_size", "inputs", "files", "layout"])
def test_a_missing_field_is_named(standard: Path, field: str) -> None:
    _refused(_edit(standard, **{field: DELETE}), field, "missing")


def test_n_head_that_breaks_n_embd_names_n_embd(standard: Path) -> None:
    _refused(_edit(standard, n_head=3), "n_embd", "[48, 48]")


@pytest.mark.parametrize("max_length", [10**15, 129, None, 1, "128"])
def test_fused_max_length_fits_the_context(fused: Path, max_length: Any) -> None:
    # 10**15 once went straight to numpy (931 TiB); now it never reaches an allocation.
    _refused(_edit(fused, max_length=max_length), "max_length", "[2, 128]")


def test_layout_that_does_not_match_the_graph(standard: Path, fused: Path) -> None:
    _refused(_edit(standard, layout="fused", max_length=128), "inputs")
    theirs = json.loads((fused / MANIFEST_FILE).read_text())
    _refused(_edit(standard, layout="fused", max_length=128, inputs=theirs["inputs"],
                   outputs=theirs["outputs"]), "does not match")


def test_cache_dtype_that_does_not_match_the_graph(standard: Path) -> None:
    _refused(_edit(standard, cache_dtype="float16"), "cache_dtype")


def test_unknown_keys_are_ignored(standard: Path) -> None:
    model = Model(_edit(standard, exported_by_a_newer_version={"x": 1}))
    assert model.generate("Hello", max_new_tokens=2).token_ids


@pytest.mark.parametrize("make", ["folder", "not_utf8", "not_json", "a_list", "huge", "deep"])
def test_an_unreadable_manifest_is_named(standard: Path, make: str) -> None:
    path = standard / MANIFEST_FILE
    path.unlink()
    if make == "folder":
        path.mkdir()
    else:
        path.write_bytes({"not_utf8": b'{"layout": "\xff"}', "not_json": b"{layout",
                          "a_list": b"[1, 2]", "huge": b" " * (5 << 20) + b"{}",
                          "deep": b"[" * 100_000 + b"]" * 100_000}[make])
    _refused(standard, MANIFEST_FILE)


def test_a_manifest_linked_from_outside_is_not_read(standard: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    shutil.copy(standard / MANIFEST_FILE, outside)
    (standard / MANIFEST_FILE).unlink()
    (standard / MANIFEST_FILE).symlink_to(outside)
    _refused(standard, "not a regular file inside")


# --- paths ------------------------------------------------------------------------------

OUTSIDE_PATHS = ["../outside.json", "/etc/passwd", "a/../../outside.json", "..",
                 "../../../../proc/self/pagemap", "C:/x", "a\\..\\b", "", "."]


@pytest.mark.parametrize("rel", OUTSIDE_PATHS)
def test_paths_outside_the_folder_are_refused_before_any_read(standard: Path, rel: str
                                                              ) -> None:
    files = json.loads((standard / MANIFEST_FILE).read_text())["files"]
    digest = "0" * 64
    _refused(_edit(standard, files={**files, rel: digest}), "files", "re-export")
    _refused(_edit(standard, graph_file=rel, files={**files, rel: digest}), "re-export")
    _refused(_edit(standard, tokenizer_file=rel, files={**files, rel: digest}), "re-export")


def test_missing_and_present_outside_files_look_the_same(standard: Path,
                                                         tmp_path: Path) -> None:
    files = json.loads((standard / MANIFEST_FILE).read_text())["files"]
    rel = "../secret.txt"
    _edit(standard, files={**files, rel: "0" * 64})
    absent = _refused(standard)
    (tmp_path / "secret.txt").write_text("hello")
    assert _refused(standard) == absent


def test_a_symlink_out_of_the_folder_is_refused(standard: Path, tmp_path: Path) -> None:
    outside = tmp_path / "tokenizer.json"
    shutil.copy(standard / "tokenizer.json", outside)
    (standard / "tokenizer.json").unlink()
    (standard / "tokenizer.json").symlink_to(outside)
    _refused(standard, "outside the model folder")


def test_a_symlink_loop_is_refused(standard: Path) -> None:
    (standard / "tokenizer.json").unlink()
    (standard / "tokenizer.json").symlink_to(standard / "tokenizer.json")
    _refused(standard, "tokenizer.json")


def test_a_symlink_within_the_folder_is_fine(standard: Path) -> None:
    (standard / "sub").mkdir()
    os.replace(standard / "tokenizer.json", standard / "sub" / "tokenizer.json")
    (standard / "tokenizer.json").symlink_to(Path("sub") / "tokenizer.json")
    assert Model(standard).encode("Hello world")


def test_a_listed_path_that_is_a_folder_is_refused(standard: Path) -> None:
    (standard / "sub").mkdir()
    files = json.loads((standard / MANIFEST_FILE).read_text())["files"]
    _refused(_edit(standard, files={**files, "sub": "0" * 64}), "not a regular file")


# --- what held up before: hashes, external data --------------------------------------------

def test_swapped_truncated_and_corrupt_files_are_caught(standard: Path) -> None:
    tok = standard / "tokenizer.json"
    tok.unlink()
    shutil.copy(standard / "tokenizer_config.json", tok)  # swapped
    _refused(standard, "tokenizer.json", "does not match")
    graph = standard / "model.onnx"
    data = graph.read_bytes()
    graph.unlink()  # a hard link: write a new file, not through the link
    graph.write_bytes(data[: len(data) // 2])
    _refused(standard, "model.onnx", "does not match")


def test_a_corrupt_byte_with_mtime_restored_is_caught(standard: Path) -> None:
    Model(standard)  # recorded as verified
    graph = standard / "model.onnx"
    st = graph.stat()
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.unlink()
    graph.write_bytes(bytes(data))
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))
    _refused(standard, "model.onnx", "does not match")


def test_onnxruntime_refuses_external_data_outside_the_folder(standard: Path,
                                                              tmp_path: Path) -> None:
    import onnx
    from onnx.external_data_helper import set_external_data

    graph = standard / "model.onnx"
    model = onnx.load(str(graph), load_external_data=False)  # weights stay in the data file
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (tmp_path / "weights.bin").write_bytes(tensor.raw_data)
    set_external_data(tensor, location="../weights.bin", length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    graph.unlink()
    onnx.save(model, str(graph))
    _rehash(standard)
    _refused(standard, "model.onnx")


def _rehash(folder: Path) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["files"] = {rel: sha256_file(folder / rel) for rel in data["files"]}
    (folder / MANIFEST_FILE).write_text(json.dumps(data))


# --- consistency with the graph ---------------------------------------------------------

def _set_graph_props(folder: Path, props: dict[str, str] | None) -> None:
    """Replace the graph's gpt2onnx.* metadata with ``props`` (None: remove it, as in a
    folder exported before the exporter wrote it) and re-hash."""
    import onnx

    graph = folder / "model.onnx"
    model = onnx.load(str(graph), load_external_data=False)  # weights stay in the data file
    kept = [p for p in model.metadata_props if not p.key.startswith("gpt2onnx.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in kept}, **(props or {})})
    graph.unlink()
    onnx.save(model, str(graph))
    _rehash(folder)


@pytest.mark.parametrize("layout", ["standard", "fused"])
def test_context_longer_than_the_position_table(standard: Path, fused: Path,
                                                layout: str) -> None:
    """Without the graph's metadata (older exports) the load probes the last position."""
    folder = standard if layout == "standard" else fused
    _set_graph_props(folder, None)
    Model(folder)  # the true context loads
    edits: dict[str, Any] = {"context_length": 129}
    if layout == "fused":
        edits["max_length"] = 129
    _refused(_edit(folder, **edits), "context_length 129", "position 128")


def test_graph_props_disagreeing_with_the_manifest(standard: Path) -> None:
    from gpt2onnx.contract import Manifest

    manifest = Manifest.load(standard)
    props = {**graph_props(manifest), "gpt2onnx.context_length": "64"}
    _set_graph_props(standard, props)
    _refused(standard, "gpt2onnx.context_length", "64", "128")
    _set_graph_props(standard, graph_props(manifest))
    assert Model(standard).generate("Hi", max_new_tokens=2).token_ids



@pytest.mark.parametrize("label", ["int8", "fp16"])
def test_a_precision_label_the_graph_does_not_carry(fused: Path, label: str) -> None:
    # An fp32 graph whose manifest says int8 would be reported, benchmarked and used as
    # int8; the graph's own label (graph_props) refuses it.
    _refused(_edit(fused, precision=label), "gpt2onnx.precision", "fp32", label)

def test_vocab_size_that_does_not_match_the_logits(standard: Path) -> None:
    _refused(_edit(standard, vocab_size=50000, bos_token_id=0, eos_token_id=0), "50000",
             "50257")


# --- text that is not Unicode -------------------------------------------------------------

def test_lone_surrogates_are_a_parameter_error(tiny_standard: Path) -> None:
    model = Model(tiny_standard)
    text = "Hello \udcff world"
    calls: list[Callable[[], object]] = [
        lambda: model.encode(text), lambda: model.generate(text, max_new_tokens=1),
        lambda: model.score(text), lambda: list(model.stream(text, max_new_tokens=1)),
        lambda: model.generate_batch(["fine", text]),
    ]
    for call in calls:
        with pytest.raises(InvalidParameterError, match="character 6"):
            call()
    with pytest.raises(InvalidParameterError, match="NoneType"):
        model.generate(None)  # type: ignore[arg-type]


# --- the property: random edits are errors or harmless, and never read outside --------------

_WATCH: dict[str, Any] = {"root": None, "outside": []}


def _audit(event: str, args: tuple) -> None:
    root = _WATCH["root"]
    if root is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    allowed = [root, *_WATCH["allowed"]]
    if not any(path == a or path.startswith(a.rstrip(os.sep) + os.sep) for a in allowed):
        _WATCH["outside"].append(path)


@pytest.fixture(scope="module")
def watched() -> Iterator[dict[str, Any]]:
    """Audit hooks cannot be removed: one is added once, and acts only while a root is set."""
    if not getattr(sys, "_gpt2onnx_folder_audit", False):
        sys.addaudithook(_audit)
        sys._gpt2onnx_folder_audit = True  # type: ignore[attr-defined]
    record = cache_dir()
    # Python's own files (lazy imports, encodings) and the verified-files record.
    _WATCH["allowed"] = [os.path.realpath(p) for p in
                         {sys.prefix, sys.base_prefix, *sys.path} if p] + (
        [os.path.realpath(record)] if record else [])
    yield _WATCH
    _WATCH["root"] = None


PATHS = st.sampled_from(["../outside.json", "/etc/passwd", "a/../../b", "..", "/",
                         "model.onnx", "tokenizer.json", "manifest.json", "sub/../model.onnx",
                         "../../../../proc/self/pagemap", "link_out", "loop", "nope.json"])
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 300),
    st.floats(allow_nan=True), st.text(max_size=12), PATHS,
    st.lists(st.one_of(st.integers(), st.text(max_size=8)), max_size=3),
    st.dictionaries(PATHS, st.one_of(st.text(max_size=8), st.just("0" * 64)), max_size=3),
)
KEYS = st.sampled_from(
    ["layout", "precision", "provider", "n_layer", "n_head", "head_dim", "n_embd",
     "vocab_size", "context_length", "bos_token_id", "eos_token_id", "pad_token_id",
     "cache_dtype", "inputs", "outputs", "graph_file", "tokenizer_file", "files", "opset",
     "format_version", "max_length", "source", "new_key"])
EDIT = st.one_of(
    st.tuples(st.just("set"), KEYS, VALUES),
    st.tuples(st.just("delete"), KEYS, st.none()),
    st.tuples(st.just("add_file"), PATHS, st.just("0" * 64)),
    st.tuples(st.just("link_out"), st.sampled_from(["tokenizer.json", "model.onnx"]),
              st.none()),
)


# database=None: no .hypothesis folder in the checkout; a failure prints its example.
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(EDIT, min_size=1, max_size=3))
def test_random_edits_never_read_outside(tiny_standard: Path, watched: dict[str, Any],
                                         edits: list[tuple[str, Any, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(tiny_standard, Path(tmp) / "model")
        secret = Path(tmp) / "outside.json"
        secret.write_text('{"secret": true}')
        (folder / "link_out").symlink_to(secret)
        (folder / "loop").symlink_to(folder / "loop")
        data = json.loads((folder / MANIFEST_FILE).read_text())
        for kind, key, value in edits:
            if kind == "set":
                data[key] = value
            elif kind == "delete":
                data.pop(key, None)
            elif kind == "add_file" and isinstance(data.get("files"), dict):
                data["files"][key] = value
            elif kind == "link_out" and not (folder / key).is_symlink():
                shutil.copy(folder / key, Path(tmp) / key)
                (folder / key).unlink()
                (folder / key).symlink_to(Path(tmp) / key)
        (folder / MANIFEST_FILE).write_text(json.dumps(data))
        watched["outside"] = []
        watched["root"] = os.path.realpath(folder)
        try:
            Model(folder)
        except ModelFolderError:
            pass  # the typed error is the point; anything else fails the test
        finally:
            watched["root"] = None
        assert watched["outside"] == [], f"read outside the folder: {watched['outside']}"


def test_the_audit_hook_sees_a_read_outside(tiny_standard: Path, watched: dict[str, Any],
                                            tmp_path: Path) -> None:
    """The property above is only as good as its witness."""
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    watched["outside"] = []
    watched["root"] = os.path.realpath(tiny_standard)
    try:
        secret.read_text()
        (Path(tiny_standard) / MANIFEST_FILE).read_text()
    finally:
        watched["root"] = None
    assert watched["outside"] == [os.path.realpath(secret)]


def test_an_extra_input_is_named(fused: Path) -> None:
    inputs = json.loads((fused / MANIFEST_FILE).read_text())["inputs"]
    _refused(_edit(fused, inputs=[*inputs, "past_key_values.7.key"]),
             "unexpected ['past_key_values.7.key']", "lacks []")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_standard: Path) -> None:
    from dataclasses import replace

    from gpt2onnx.runtime.folder import check_tokenizer_fits

    model = Model(tiny_standard)
    check_tokenizer_fits(model.tokenizer, model.manifest, tiny_standard)  # its own fits
    smaller = replace(model.manifest, vocab_size=8192)
    with pytest.raises(ModelFolderError, match=r"50257 tokens.*vocab_size is 8192"):
        check_tokenizer_fits(model.tokenizer, smaller, tiny_standard)


def test_a_smaller_tokenizer_without_the_models_eos_is_refused_at_load(tiny_standard: Path,
                                                                        tmp_path: Path
                                                                        ) -> None:
    # The embedded model's 8,192-token tokenizer fits GPT-2's vocabulary but has no id
    # 50256 (GPT-2's EOS): it would load and generate garbage.
    from tests.conftest import EMBEDDED_MODEL

    folder = Path(shutil.copytree(tiny_standard, tmp_path / "swapped"))
    shutil.copy(EMBEDDED_MODEL / "tokenizer.json", folder / "tokenizer.json")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"]["tokenizer.json"] = sha256_file(folder / "tokenizer.json")
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=r"no token for the manifest's bos_token_id 50256"):
        Model(folder)
