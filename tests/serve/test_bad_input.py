"""Every bad input gets a 4xx in the OpenAI error shape, naming the field; values the
runtime validates carry the runtime's own message (one validation path)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime import GenerationParams, Model
from gpt2onnx.runtime.generator import plan_row
from gpt2onnx.serve import Engine
from tests.serve.helpers import make_app

CONTEXT, VOCAB = 128, 50257


@pytest.fixture(scope="module")
def client(module_engine: Engine) -> Iterator[TestClient]:
    with TestClient(make_app(module_engine, max_body_bytes=4096)) as c:
        yield c


def runtime_message(prompt: list[int] | None = None, **params: Any) -> str:
    """What the Python API says for the same mistake, under the HTTP field names."""
    with pytest.raises(InvalidParameterError) as info:
        p = GenerationParams(**params)
        plan_row(prompt if prompt is not None else [1], p, CONTEXT, VOCAB)
    return str(info.value).replace("max_new_tokens", "max_tokens")


def assert_error(r: Any, status: int, param: str | None, message: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    if message is not None:
        assert error["message"] == message
    return error


# (body, param, the runtime call that must give the same message, or None)
CASES: list[tuple[str, dict[str, Any], str, dict[str, Any] | None]] = [
    ("prompt not text or ids", {"prompt": 5}, "prompt", None),
    ("prompt mixes types", {"prompt": [1, "a"]}, "prompt", None),
    ("prompt of booleans", {"prompt": [True]}, "prompt", None),
    ("missing prompt", {"max_tokens": 3}, "prompt", None),
    ("empty prompt", {"prompt": ""}, "prompt", {"prompt": []}),
    ("empty id list", {"prompt": []}, "prompt", {"prompt": []}),
    ("prompt beyond the context", {"prompt": [1] * (CONTEXT + 1)}, "prompt",
     {"prompt": [1] * (CONTEXT + 1), "max_new_tokens": 16}),
    ("prompt + max_tokens beyond the context", {"prompt": [1] * 100, "max_tokens": 50},
     "max_tokens", {"prompt": [1] * 100, "max_new_tokens": 50}),
    ("token id above the vocabulary", {"prompt": [1, VOCAB]}, "prompt", {"prompt": [1, VOCAB]}),
    ("negative token id", {"prompt": [-1]}, "prompt", {"prompt": [-1]}),
    ("max_tokens < 0", {"prompt": "Hi", "max_tokens": -1}, "max_tokens", {"max_new_tokens": -1}),
    ("max_tokens a string", {"prompt": "Hi", "max_tokens": "5"}, "max_tokens",
     {"max_new_tokens": "5"}),
    ("max_tokens a float", {"prompt": "Hi", "max_tokens": 2.5}, "max_tokens",
     {"max_new_tokens": 2.5}),
    ("temperature < 0", {"prompt": "Hi", "temperature": -0.5}, "temperature",
     {"temperature": -0.5}),
    ("temperature a string", {"prompt": "Hi", "temperature": "hot"}, "temperature",
     {"temperature": "hot"}),
    ("top_p 0", {"prompt": "Hi", "top_p": 0}, "top_p", {"top_p": 0}),
    ("top_p above 1", {"prompt": "Hi", "top_p": 1.5}, "top_p", {"top_p": 1.5}),
    ("negative top_k", {"prompt": "Hi", "top_k": -1}, "top_k", {"top_k": -1}),
    ("top_k a float", {"prompt": "Hi", "top_k": 1.5}, "top_k", {"top_k": 1.5}),
    ("repetition_penalty 0", {"prompt": "Hi", "repetition_penalty": 0}, "repetition_penalty",
     {"repetition_penalty": 0}),
    ("negative seed", {"prompt": "Hi", "seed": -1}, "seed", {"seed": -1}),
    ("too many stop strings", {"prompt": "Hi", "stop": ["x"] * 17}, "stop",
     {"stop": ("x",) * 17}),
    ("empty stop string", {"prompt": "Hi", "stop": [""]}, "stop", {"stop": ("",)}),
    ("stop not text", {"prompt": "Hi", "stop": 5}, "stop", None),
    ("stop list of numbers", {"prompt": "Hi", "stop": [5]}, "stop", {"stop": (5,)}),
    ("n above its limit", {"prompt": "Hi", "n": 9}, "n", None),
    ("n 0", {"prompt": "Hi", "n": 0}, "n", None),
    ("n a string", {"prompt": "Hi", "n": "2"}, "n", None),
    # module_engine: 8 slots + 256 queued rows per request at most
    ("prompts x n above the limit", {"prompt": ["a"] * 133, "n": 2}, "prompt", None),
    ("logprobs above its limit", {"prompt": "Hi", "logprobs": 21}, "logprobs",
     {"logprobs": 21}),
    ("logprobs a string", {"prompt": "Hi", "logprobs": "2"}, "logprobs", {"logprobs": "2"}),
    ("stream not a bool", {"prompt": "Hi", "stream": "yes"}, "stream", None),
    ("echo not a bool", {"prompt": "Hi", "echo": 1}, "echo", None),
    ("stream_options not an object", {"prompt": "Hi", "stream_options": 1}, "stream_options",
     None),
    ("include_usage not a bool", {"prompt": "Hi", "stream_options": {"include_usage": 1}},
     "stream_options.include_usage", None),
    ("echo with logprobs above its limit", {"prompt": "Hi", "echo": True, "logprobs": 21},
     "logprobs", {"logprobs": 21}),
    ("prompt_logprobs above its limit", {"prompt": "Hi", "prompt_logprobs": 21},
     "prompt_logprobs", {"prompt_logprobs": 21}),
    ("min_p above 1", {"prompt": "Hi", "min_p": 1.5}, "min_p", {"min_p": 1.5}),
    ("min_tokens negative", {"prompt": "Hi", "min_tokens": -1}, "min_tokens",
     {"min_tokens": -1, "max_new_tokens": 16}),
    ("min_tokens above max_tokens", {"prompt": "Hi", "min_tokens": 20, "max_tokens": 5},
     "min_tokens", {"min_tokens": 20, "max_new_tokens": 5}),
    ("frequency_penalty a string", {"prompt": "Hi", "frequency_penalty": "x"},
     "frequency_penalty", {"frequency_penalty": "x"}),
    ("unsupported suffix", {"prompt": "Hi", "suffix": "end"}, "suffix", None),
    ("presence_penalty above 2", {"prompt": "Hi", "presence_penalty": 2.5},
     "presence_penalty", {"presence_penalty": 2.5}),
    ("best_of above n", {"prompt": "Hi", "best_of": 2}, "best_of", None),
    ("unknown on_overflow", {"prompt": "Hi", "on_overflow": "wrap"}, "on_overflow",
     {"on_overflow": "wrap"}),
    # Issue 16: values float32 (or int32) cannot hold are refused, with the API's message.
    ("temperature below float32's useful range", {"prompt": "Hi", "temperature": 1e-39},
     "temperature", {"temperature": 1e-39}),
    ("temperature above its bound", {"prompt": "Hi", "temperature": 3e38}, "temperature",
     {"temperature": 3e38}),
    ("temperature beyond float32", {"prompt": "Hi", "temperature": 1e39}, "temperature",
     {"temperature": 1e39}),
    ("top_k above int32", {"prompt": "Hi", "top_k": 2**31}, "top_k", {"top_k": 2**31}),
    ("top_k huge", {"prompt": "Hi", "top_k": 10**30}, "top_k", {"top_k": 10**30}),
    ("repetition_penalty 1e-300", {"prompt": "Hi", "repetition_penalty": 1e-300},
     "repetition_penalty", {"repetition_penalty": 1e-300}),
    ("repetition_penalty 1e300", {"prompt": "Hi", "repetition_penalty": 1e300},
     "repetition_penalty", {"repetition_penalty": 1e300}),
    ("frequency_penalty 1e300", {"prompt": "Hi", "frequency_penalty": 1e300},
     "frequency_penalty", {"frequency_penalty": 1e300}),
]


@pytest.mark.parametrize("body, param, same_as",
                         [pytest.param(b, p, s, id=name) for name, b, p, s in CASES])
def test_bad_field_gets_400_naming_it(client: TestClient, body: dict[str, Any], param: str,
                                      same_as: dict[str, Any] | None) -> None:
    message = runtime_message(**same_as) if same_as is not None else None
    error = assert_error(client.post("/v1/completions", json=body), 400, param, message)
    assert error["message"].endswith(".")


@pytest.mark.parametrize("raw, param", [
    ('{"prompt": "Hi",', None),
    ("[1, 2]", None),
    ("\xff\xfe", None),
    ('{"prompt": "Hi", "temperature": NaN}', "temperature"),
    ('{"prompt": "Hi", "temperature": Infinity}', "temperature"),
    ('{"prompt": "Hi", "top_p": -Infinity}', "top_p"),
], ids=["truncated JSON", "not an object", "not UTF-8", "NaN temperature",
        "infinite temperature", "infinite top_p"])
def test_malformed_json_and_non_finite_numbers(client: TestClient, raw: str,
                                               param: str | None) -> None:
    content = raw.encode("latin-1")
    r = client.post("/v1/completions", content=content,
                    headers={"content-type": "application/json"})
    error = assert_error(r, 400, param)
    if param is None:
        assert error["code"] in ("invalid_json", "invalid_type")
    else:
        assert "must be finite" in error["message"]


def test_context_errors_say_context_length_exceeded(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": [1] * 100, "max_tokens": 50})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "at most 28 new tokens" in r.json()["error"]["message"]


def test_body_over_the_limit_gets_413(client: TestClient) -> None:
    body = json.dumps({"prompt": "x" * 5000}).encode()
    json_type = {"content-type": "application/json"}
    assert_error(client.post("/v1/completions", content=body, headers=json_type), 413, None)

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    assert_error(client.post("/v1/completions", content=chunked(), headers=json_type), 413,
                 None)


def test_format_1_folder_refuses_prompt_logprobs_with_a_400(tiny_checkpoint, tmp_path):
    from fastapi.testclient import TestClient

    from gpt2onnx.serve import Engine, EngineConfig
    from tests.runtime.format1 import write_format1_folder
    from tests.serve.helpers import make_app

    folder = write_format1_folder(tiny_checkpoint, tmp_path / "v1")
    engine = Engine(lambda: Model(folder), EngineConfig(max_batch_size=2))
    assert engine.start().wait_ready(timeout=60)
    try:
        with TestClient(make_app(engine)) as client:
            for body, param in (({"prompt": "Hi", "echo": True, "logprobs": 1,
                                  "max_tokens": 0}, "echo"),
                                ({"prompt": "Hi", "prompt_logprobs": 1}, "prompt_logprobs")):
                error = assert_error(client.post("/v1/completions", json=body), 400, param)
                assert "re-export" in error["message"]
            ok = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
            assert ok.status_code == 200  # plain generation still works
    finally:
        engine.stop(drain_timeout=0)


@pytest.mark.parametrize("edge", [
    {"temperature": 1e4, "top_k": 2**31 - 1},
    {"temperature": 1e-4, "repetition_penalty": 100.0},
    {"temperature": 1e-4, "repetition_penalty": 0.01, "frequency_penalty": -2.0},
    {"temperature": 1e4, "presence_penalty": 2.0, "min_p": 1.0},
], ids=["highest temperature and top_k", "lowest temperature, highest penalty",
        "lowest temperature and penalties", "highest temperature, presence and min_p"])
def test_accepted_extremes_answer_200_with_tokens_of_the_vocabulary(
        client: TestClient, edge: dict[str, Any]) -> None:
    """The bounds themselves are accepted and cannot overflow float32 into garbage ids."""
    r = client.post("/v1/completions",
                    json={"prompt": "Hello", "max_tokens": 4, "seed": 1, "logprobs": 0,
                          "ignore_eos": True, **edge})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == 4
    assert all(lp is None or lp == lp for lp in choice["logprobs"]["token_logprobs"])  # no NaN
