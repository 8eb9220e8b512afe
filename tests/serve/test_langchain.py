"""langchain-openai against a real server: `OpenAI.generate()` sends up to 20 prompts in
one request (queued row by row here), `ChatOpenAI` goes through the chat template."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gpt2onnx.runtime.model import Model
from gpt2onnx.serve import Engine
from tests.serve.helpers import MODEL_NAME

langchain_openai = pytest.importorskip("langchain_openai",
                                       reason="langchain-openai is not installed ([dev])")


def test_openai_llm_generates_20_prompts_in_one_request(
        make_engine: Callable[..., Engine], live_server: Callable[..., Any],
        ref_model: Model) -> None:
    engine = make_engine(max_batch_size=4, max_queue=16)
    server = live_server(engine)
    llm = langchain_openai.OpenAI(base_url=server.url + "/v1", api_key="unused",
                                  model=MODEL_NAME, max_tokens=6, temperature=0,
                                  max_retries=0)
    prompts = [f"Item number {i} is" for i in range(20)]
    result = llm.generate(prompts)
    assert engine.metrics.requests.labels("success")._value.get() == 1  # one request
    texts = [g[0].text for g in result.generations]
    assert texts == [ref_model.generate(p, max_new_tokens=6).text for p in prompts]


def test_chat_model_invoke_and_stream(make_engine: Callable[..., Engine],
                                      live_server: Callable[..., Any]) -> None:
    engine = make_engine()
    server = live_server(engine, chat_template="dialogpt")
    chat = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused",
                                       model=MODEL_NAME, max_tokens=5, temperature=0,
                                       max_retries=0)
    whole = chat.invoke("Hello there").content
    pieces = "".join(c.content for c in chat.stream("Hello there"))
    assert pieces == whole
    assert engine.metrics.requests.labels("success")._value.get() == 2
