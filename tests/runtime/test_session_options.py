"""Session options: intra-op spinning is on by default, off by argument or environment,
and reaches the session that Model builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime import Model
from gpt2onnx.runtime.folder import SPIN_ENV, session_options

SPIN_KEY = "session.intra_op.allow_spinning"


@pytest.mark.parametrize(("env", "arg", "expected"), [
    (None, None, "1"),  # onnxruntime's own default
    ("0", None, "0"),
    ("1", None, "1"),
    ("off", None, "0"),
    (" False ", None, "0"),
    ("yes", None, "1"),
    ("0", True, "1"),  # an explicit argument wins over the environment
    (None, False, "0"),
])
def test_spinning_default_env_and_argument(monkeypatch: pytest.MonkeyPatch, env: str | None,
                                           arg: bool | None, expected: str) -> None:
    if env is None:
        monkeypatch.delenv(SPIN_ENV, raising=False)
    else:
        monkeypatch.setenv(SPIN_ENV, env)
    assert session_options(spinning=arg).get_session_config_entry(SPIN_KEY) == expected


def test_model_passes_spinning_to_its_session(tiny_fused: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import gpt2onnx.runtime.folder as folder

    seen: list[bool | None] = []
    original = folder.session_options

    def spy(threads: int | None = None, spinning: bool | None = None) -> object:
        seen.append(spinning)
        return original(threads, spinning)

    monkeypatch.setattr(folder, "session_options", spy)
    Model(tiny_fused, spinning=False)
    Model(tiny_fused)
    assert seen == [False, None]


@pytest.mark.parametrize("bad", ["", "2", "maybe"])
def test_a_bad_spin_variable_is_a_typed_error(monkeypatch: pytest.MonkeyPatch,
                                              bad: str) -> None:
    monkeypatch.setenv(SPIN_ENV, bad)
    with pytest.raises(InvalidParameterError, match=f"{SPIN_ENV}={bad!r} is not one of"):
        session_options()


def test_spin_within_runs_only() -> None:
    """spinning="run": threads spin inside a run and stop at its end (for a model and its
    speculative draft taking turns on the same cores)."""
    opts = session_options(spinning="run")
    assert opts.get_session_config_entry(SPIN_KEY) == "1"
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(InvalidParameterError, match="spinning must be True, False or 'run'"):
        session_options(spinning="sometimes")


def test_speculating_clis_spin_within_runs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt2onnx.runtime.generate import speculative_spinning

    monkeypatch.delenv(SPIN_ENV, raising=False)
    assert speculative_spinning(None, "some/draft/folder") == "run"
    assert speculative_spinning(True, "some/draft/folder") == "run"
    assert speculative_spinning(False, "some/draft/folder") is False  # --no-spin wins
    assert speculative_spinning(None, "ngram") is None  # no second model
    assert speculative_spinning(None, None) is None


def test_spin_variable_run_spins_within_runs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt2onnx.runtime.folder import spin_from_env

    monkeypatch.setenv(SPIN_ENV, " Run ")
    assert spin_from_env() == "run"
    opts = session_options()
    assert opts.get_session_config_entry(SPIN_KEY) == "1"
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
