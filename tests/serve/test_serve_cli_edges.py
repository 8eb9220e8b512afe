"""The serve CLI's start-up checks: a host or port it cannot listen on, a --max-batch-size
whose KV cache cannot fit in memory, and a range for every numeric flag, each one stderr
line and exit 2 before the model loads (no uvicorn log lines, no traceback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import gpt2onnx.serve.__main__ as serve_main
from gpt2onnx.contract import Manifest
from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.kvmem import kv_cache_bytes
from gpt2onnx.runtime.folder import open_manifest
from gpt2onnx.serve.__main__ import (
    INT_RANGES,
    MAX_BATCH_SIZE,
    MAX_SECONDS,
    check_bind,
    check_cache_fits,
    main,
    parse_args,
)

SERVE = [sys.executable, "-m", "gpt2onnx.serve"]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def one_line(err: str, *words: str) -> str:
    assert "Traceback" not in err and "Uvicorn" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    for word in words:
        assert word in err, (word, err)
    return err


def run_serve(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ})


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here fails before the engine (and the model) would start."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the engine was built: the check came too late")

    monkeypatch.setattr(serve_main, "Engine", refuse)


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port held by a listening socket (as another server would hold it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# ---- the bind ---------------------------------------------------------------------------

def test_a_host_that_does_not_resolve_is_one_line(tiny_fused: Path) -> None:
    proc = run_serve(str(tiny_fused), "--host", "999.1.1.1")
    assert proc.returncode == 2, proc.stderr
    one_line(proc.stderr, "error: cannot listen on 999.1.1.1:8000", "does not resolve",
             "--host", "--port")


def test_a_port_in_use_is_one_line(tiny_fused: Path, held_port: int) -> None:
    proc = run_serve(str(tiny_fused), "--port", str(held_port))
    assert proc.returncode == 2, proc.stderr
    one_line(proc.stderr, f"error: cannot listen on 127.0.0.1:{held_port}",
             "in use", "--port")


def test_an_address_of_another_machine_is_refused(tiny_fused: Path, no_engine: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): no machine has it.
    assert main([str(tiny_fused), "--host", "192.0.2.1", "--port", "0"]) == 2
    one_line(capsys.readouterr().err, "error: cannot listen on 192.0.2.1:0", "--host")


@pytest.mark.parametrize("host", ["bad host name", "a" * 300, "x\x00y", "-1"])
def test_hosts_that_are_no_name_are_refused(host: str) -> None:
    with pytest.raises(InvalidParameterError, match="cannot listen on"):
        check_bind(host, 0)


def test_a_free_port_and_port_0_pass(held_port: int) -> None:
    check_bind("127.0.0.1", 0)  # any free port: what uvicorn does with --port 0
    check_bind("localhost", 0)
    with pytest.raises(InvalidParameterError, match=f"127.0.0.1:{held_port} .*in use"):
        check_bind("127.0.0.1", held_port)


def test_the_bind_check_leaves_the_port_free() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_bind("127.0.0.1", port)
    with socket.socket() as again:  # the check closed its socket: the port can be had
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()


# ---- the KV cache against memory ---------------------------------------------------------

def _row_bytes(m: Manifest) -> int:
    assert m.max_length
    return kv_cache_bytes(m.n_layer, m.n_head, m.head_dim, 1, m.max_length,
                          {"float32": 4, "float16": 2}[m.cache_dtype])


def test_a_cache_bigger_than_memory_is_one_line(tiny_fused: Path, no_engine: None,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    row = _row_bytes(open_manifest(tiny_fused, verify=False))
    monkeypatch.setattr(serve_main, "physical_memory", lambda: 3 * row + 1)
    assert main([str(tiny_fused), "--max-batch-size", "8", "--port", "0"]) == 2
    one_line(capsys.readouterr().err, "error: --max-batch-size 8 needs a KV cache of",
             "8 rows x", "more than this machine's", "pass --max-batch-size 3 or less",
             "smaller --max-length")


def test_a_cache_that_fits_passes(tiny_fused: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = open_manifest(tiny_fused, verify=False)
    row = _row_bytes(manifest)
    monkeypatch.setattr(serve_main, "physical_memory", lambda: 4 * row)
    check_cache_fits(manifest, 4, "cpu")
    with pytest.raises(InvalidParameterError, match="--max-batch-size 5 needs"):
        check_cache_fits(manifest, 5, "cpu")
    check_cache_fits(manifest, 5, "cuda")  # the GPU's memory is onnxruntime's to report
    monkeypatch.setattr(serve_main, "physical_memory", lambda: row - 1)
    with pytest.raises(InvalidParameterError, match="one row does not fit either"):
        check_cache_fits(manifest, 1, "cpu")
    monkeypatch.setattr(serve_main, "physical_memory", lambda: None)  # unknown: no check
    check_cache_fits(manifest, MAX_BATCH_SIZE, "cpu")


def test_the_reviewers_batch_size_is_one_line(tiny_fused: Path) -> None:
    proc = run_serve(str(tiny_fused), "--max-batch-size", "100000000")
    assert proc.returncode == 2, proc.stderr
    one_line(proc.stderr, "--max-batch-size", f"[1, {MAX_BATCH_SIZE}]", "100000000")


# ---- every numeric flag has a range -------------------------------------------------------

@pytest.mark.parametrize("dest", sorted(INT_RANGES))
def test_int_flags_name_their_range_for_text(dest: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    low, high = INT_RANGES[dest]
    for text in ("1e12", "abc", "nan", "2.5"):
        with pytest.raises(SystemExit) as exc:
            parse_args(["m", _flag(dest), text])
        assert exc.value.code == 2
        one_line(capsys.readouterr().err, _flag(dest), f"an integer in [{low}, {high}]",
                 repr(text))


@pytest.mark.parametrize("dest", sorted(INT_RANGES))
def test_int_flags_above_their_range_exit_2(tiny_fused: Path, dest: str, no_engine: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    low, high = INT_RANGES[dest]
    assert main([str(tiny_fused), _flag(dest), str(high + 1)]) == 2
    one_line(capsys.readouterr().err, f"error: {_flag(dest)} must be in [{low}, {high}]",
             f"got {high + 1}")


@pytest.mark.parametrize("dest", ["timeout", "shutdown_timeout", "header_timeout",
                                  "body_timeout"])
def test_seconds_flags_have_a_range(tiny_fused: Path, dest: str, no_engine: None,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["m", _flag(dest), "abc"])
    one_line(capsys.readouterr().err, _flag(dest), "a number of seconds in",
             f"{MAX_SECONDS:g}]", "'abc'")
    assert main([str(tiny_fused), _flag(dest), "1e9"]) == 2
    one_line(capsys.readouterr().err, f"error: {_flag(dest)} must be at most 86400")


def test_max_stall_names_what_it_takes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["m", "--max-stall", "abc"])
    one_line(capsys.readouterr().err, "--max-stall", "a ratio above 1")


def test_the_defaults_are_inside_the_ranges() -> None:
    args = parse_args(["m"])
    for dest, (low, high) in INT_RANGES.items():
        assert low <= getattr(args, dest) <= high, dest


def test_the_reviewers_prefix_cache_is_one_line(tiny_fused: Path) -> None:
    proc = run_serve(str(tiny_fused), "--prefix-cache-mb", "1e12")
    assert proc.returncode == 2, proc.stderr
    one_line(proc.stderr, "--prefix-cache-mb", "an integer in [0, 1048576]", "'1e12'")
