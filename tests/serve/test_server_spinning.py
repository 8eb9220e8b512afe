"""The server's intra-op spinning: on by default, within runs only with a draft model,
--no-spin and GPT2ONNX_SPIN as asked, and what was chosen reaches the Model the engine
builds."""

from __future__ import annotations

from pathlib import Path

import pytest

import gpt2onnx.serve.__main__ as serve_main
from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.folder import SPIN_ENV
from gpt2onnx.serve.engine import server_spinning


@pytest.fixture(autouse=True)
def no_spin_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SPIN_ENV, raising=False)


@pytest.mark.parametrize(("asked", "speculative", "expected"), [
    (None, None, True),  # the server's default
    (None, "ngram", True),  # prompt lookup runs no second model
    (None, "draft:some/folder", "run"),  # two fully spinning sessions starve each other
    (False, None, False),  # --no-spin
    (False, "draft:some/folder", False),  # --no-spin wins over the draft's "run"
    ("run", None, "run"),
])
def test_server_spinning_without_the_variable(asked: bool | str | None,
                                              speculative: str | None,
                                              expected: bool | str) -> None:
    assert server_spinning(asked, speculative) == expected


@pytest.mark.parametrize(("env", "asked", "expected"), [
    ("1", None, True),
    ("0", None, False),
    ("run", None, "run"),
    ("1", False, False),  # the flag wins over the environment
])
def test_server_spinning_with_the_variable(monkeypatch: pytest.MonkeyPatch, env: str,
                                           asked: bool | None, expected: bool | str) -> None:
    monkeypatch.setenv(SPIN_ENV, env)
    assert server_spinning(asked, None) == expected


@pytest.mark.parametrize(("env", "expected"), [("0", False), ("1", "run"), ("run", "run")])
def test_the_variable_with_a_draft_model(monkeypatch: pytest.MonkeyPatch, env: str,
                                         expected: bool | str) -> None:
    """The serve and generate CLIs read it the same way: 0 turns spinning off even with
    a draft; on becomes "run"."""
    from gpt2onnx.runtime.generate import speculative_spinning

    monkeypatch.setenv(SPIN_ENV, env)
    assert server_spinning(None, "draft:some/folder") == expected
    assert speculative_spinning(None, "some/folder") == expected


def test_a_bad_variable_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SPIN_ENV, "sometimes")
    with pytest.raises(InvalidParameterError, match="'sometimes' is not one of"):
        server_spinning(None, None)


def test_a_bad_variable_stops_the_server_with_exit_2(tiny_fused: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    monkeypatch.setenv(SPIN_ENV, "maybe")
    assert serve_main.main([str(tiny_fused), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{SPIN_ENV}='maybe'" in err, err


class _Built(Exception):
    pass


@pytest.mark.parametrize(("flags", "expected"), [
    ([], True), (["--no-spin"], False), (["--speculative", "draft:DRAFT"], "run"),
    (["--speculative", "draft:DRAFT", "--no-spin"], False),
])
def test_the_choice_reaches_the_model(tiny_fused: Path, monkeypatch: pytest.MonkeyPatch,
                                      flags: list[str], expected: bool | str) -> None:
    flags = [f.replace("DRAFT", str(tiny_fused)) for f in flags]
    seen: dict[str, object] = {}

    def engine(factory: object, config: object) -> None:
        seen["factory"] = factory
        raise _Built

    def model(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(serve_main, "Engine", engine)
    monkeypatch.setattr(serve_main, "Model", model)
    with pytest.raises(_Built):
        serve_main._main([str(tiny_fused), "--port", "0", *flags])
    seen["factory"]()
    assert seen["spinning"] == expected and type(seen["spinning"]) is type(expected)
