"""The endpoints tools probe besides completions (/tokenize, /detokenize, /version), the
vLLM and OpenAI fields this server does not implement (refused, never ignored), and the
server's default for prompts that overflow the context (--on-overflow)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gpt2onnx import __version__
from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.serve import Engine
from tests.serve.helpers import make_app


@pytest.fixture(scope="module")
def client(module_engine: Engine) -> Iterator[TestClient]:
    with TestClient(make_app(module_engine, chat_template="dialogpt")) as c:
        yield c


def test_version(client: TestClient) -> None:
    assert client.get("/version").json() == {"version": __version__}


def test_tokenize_and_detokenize_round_trip(client: TestClient, module_engine: Engine) -> None:
    r = client.post("/tokenize", json={"prompt": "Hello there, world"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == module_engine.model.encode("Hello there, world")
    assert body["count"] == len(body["tokens"])
    assert body["max_model_len"] == module_engine.model.context_length
    back = client.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.json() == {"prompt": "Hello there, world"}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert chat.json()["tokens"] == module_engine.model.encode("Hi<|endoftext|>")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 3}, "prompt"),
    ("/tokenize", {"messages": "hi"}, "messages"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_tokenize_requests_are_400s(client: TestClient, path: str, body: dict,
                                        param: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


@pytest.mark.parametrize(("field", "value"), [
    ("stop_token_ids", [1]), ("guided_json", {"type": "object"}), ("use_beam_search", True),
    ("include_stop_str_in_output", True), ("logits_processors", ["x"]),
    ("skip_special_tokens", False), ("truncate_prompt_tokens", 5),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unimplemented_fields_are_refused_not_ignored(client: TestClient, path: str,
                                                      field: str, value: object) -> None:
    body: dict = {"prompt": "Hi"} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": "Hi"}]}
    r = client.post(path, json={**body, field: value, "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and "not supported" in error["message"]
    # ...and at their neutral value they are fine.
    neutral = {"stop_token_ids": [], "use_beam_search": False, "skip_special_tokens": True,
               "include_stop_str_in_output": False}
    if field in neutral:
        ok = client.post(path, json={**body, field: neutral[field], "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_the_server_default_for_overflowing_prompts(module_engine: Engine) -> None:
    """langchain's default max_tokens=256 on a 128-token model: a 400 by default, the
    prompt's end and a shorter max_tokens with --on-overflow truncate."""
    context = module_engine.model.context_length
    body = {"prompt": "word " * (context - 10), "max_tokens": 256, "temperature": 0}
    with TestClient(make_app(module_engine)) as strict:
        r = strict.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with TestClient(make_app(module_engine, on_overflow="truncate",
                             chat_template="dialogpt")) as lenient:
        r = lenient.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= context
        chat = lenient.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "word " * context}], "max_tokens": 256})
        assert chat.status_code == 200, chat.text
        # A request that says "error" still gets the error.
        r = lenient.post("/v1/completions", json={**body, "on_overflow": "error"})
        assert r.status_code == 400
    with pytest.raises(InvalidParameterError, match="on_overflow"):
        make_app(module_engine, on_overflow="sometimes")


def test_cli_on_overflow_is_passed_and_checked(tiny_fused: Path) -> None:
    from gpt2onnx.serve.__main__ import parse_args

    assert parse_args([str(tiny_fused), "--on-overflow", "truncate"]).on_overflow == "truncate"
    with pytest.raises(SystemExit) as exc:
        parse_args([str(tiny_fused), "--on-overflow", "maybe"])
    assert exc.value.code == 2


@pytest.mark.parametrize(("argv", "words"), [
    (["--port", "99999"], "--port must be in [0, 65535]"),
    (["--port", "-1"], "--port must be in [0, 65535]"),
    (["--max-body-bytes", "-1"], "--max-body-bytes must be >= 1"),
    (["--shutdown-timeout", "-5"], "--shutdown-timeout must be"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout must be"),
    (["--api-key", ""], "must be non-empty printable ASCII"),
    (["--api-key", "clé"], "must be non-empty printable ASCII"),
    (["--api-key", " key "], "must be non-empty printable ASCII"),
])
def test_bad_server_settings_exit_2_with_one_line(tiny_fused: Path, argv: list[str],
                                                  words: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from gpt2onnx.serve.__main__ import main

    assert main([str(tiny_fused), *argv]) == 2  # before binding a port or loading
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_an_empty_key_in_the_environment_is_refused(tiny_fused: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from gpt2onnx.serve.__main__ import API_KEY_ENV, main

    monkeypatch.setenv(API_KEY_ENV, "")
    assert main([str(tiny_fused)]) == 2
    assert f"unset {API_KEY_ENV}" in capsys.readouterr().err
