"""/v1/chat/completions and /v1/models/{id}: templates rendered as transformers renders
them, the official openai client (plain, streamed, n, logprobs), the built-in DialoGPT
template, and every bad chat request a 400 that names its field."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.serve import Engine
from gpt2onnx.serve.chat import NO_TEMPLATE, ChatTemplate, check_template_file, load_template
from tests.serve.helpers import MODEL_NAME, make_app

TOKENIZER_DIR = Path(__file__).parents[1] / "data" / "gpt2-tokenizer"
EOS = "<|endoftext|>"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": [{"type": "text", "text": "How are "},
                                         {"type": "text", "text": "you?"}]}]
# A ChatML-style template of the kind checkpoints ship, with the constructs they use.
CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "{{ raise_exception('the first message must be the system prompt') }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_client(module_engine: Engine) -> Iterator[TestClient]:
    with TestClient(make_app(module_engine, chat_template="dialogpt")) as c:
        yield c


def flat(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "".join(p["text"] for p in m["content"])} for m in messages]


def test_a_template_renders_as_transformers_apply_chat_template(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.chat_template = CHATML
    expected = tok.apply_chat_template(flat(MESSAGES), tokenize=False,
                                       add_generation_prompt=True)
    ours = ChatTemplate(CHATML, "", EOS, "test").render(flat(MESSAGES))
    assert ours == expected
    with pytest.raises(Exception, match="first message must be the system prompt"):
        ChatTemplate(CHATML, "", EOS, "test").render(flat(MESSAGES[1:]))


def test_the_folder_template_is_used_and_a_file_option_wins(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": EOS}))
    fake = SimpleNamespace(folder=tmp_path, manifest=SimpleNamespace(eos_token_id=None,
                                                                     bos_token_id=None),
                           tokenizer=None)
    assert load_template(fake, None).render(flat(MESSAGES)).endswith(  # type: ignore[union-attr]
        "<|im_start|>assistant\n")
    own = tmp_path / "mine.jinja"
    own.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_template(fake, str(own)).render(flat(MESSAGES[:2])) == \
        "[Be brief.][Hello there]"  # type: ignore[union-attr]
    assert load_template(fake, "dialogpt").render(flat(MESSAGES[:2])) == \
        f"Be brief.{EOS}Hello there{EOS}"  # type: ignore[union-attr]
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load_template(fake, None) is None
    with pytest.raises(InvalidParameterError, match="neither a file nor a built-in"):
        check_template_file(str(tmp_path / "missing.jinja"))
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(InvalidParameterError, match="does not compile"):
        check_template_file(str(tmp_path / "bad.jinja"))


def test_no_template_is_a_400_that_says_how_to_give_one(module_engine: Engine) -> None:
    with TestClient(make_app(module_engine)) as client:
        r = client.post("/v1/chat/completions", json={"messages": MESSAGES[1:2]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == NO_TEMPLATE and "--chat-template" in error["message"]
    assert error["param"] == "messages"


def test_chat_is_the_completion_of_the_rendered_prompt(chat_client: TestClient,
                                                       greedy_text: Callable[..., str]) -> None:
    r = chat_client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = "".join(m["content"] + EOS for m in flat(MESSAGES))
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant",
                                 "content": greedy_text(prompt, 6, temperature=0.0)}
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] <= 6 and body["usage"]["prompt_tokens"] > 10


@pytest.mark.parametrize(("body", "param"), [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json"}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "prompt"),
])
def test_bad_chat_requests_are_400s_naming_the_field(chat_client: TestClient,
                                                     body: dict[str, Any], param: str) -> None:
    r = chat_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_models_retrieve(chat_client: TestClient) -> None:
    r = chat_client.get(f"/v1/models/{MODEL_NAME}")
    assert r.status_code == 200 and r.json()["id"] == MODEL_NAME
    missing = chat_client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_the_openai_client_chats_plain_streamed_with_n_and_logprobs(
        module_engine: Engine, live_server: Callable[..., Any],
        greedy_text: Callable[..., str]) -> None:
    openai = pytest.importorskip("openai")
    server = live_server(module_engine, chat_template="dialogpt")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    messages = [{"role": "user", "content": "Tell me a story"}]
    expected = greedy_text(f"Tell me a story{EOS}", 8, temperature=0.0)
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                           max_tokens=8, temperature=0)
    assert plain.choices[0].message.content == expected
    pieces, roles = [], []
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                                max_tokens=8, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            roles.append(c.delta.role)
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == plain.usage.completion_tokens
    assert "".join(pieces) == expected and roles[0] == "assistant"
    several = client.chat.completions.create(model=MODEL_NAME, messages=messages, n=2,
                                             max_tokens=5, temperature=0.9, seed=3,
                                             logprobs=True, top_logprobs=2)
    assert [c.index for c in several.choices] == [0, 1]
    for c in several.choices:
        entries = c.logprobs.content
        assert 1 <= len(entries) <= 5
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
        assert "".join(e.token for e in entries) == c.message.content
