"""The HTTP API in-process (httpx through Starlette's TestClient): response shapes,
streaming, echo, n, logprobs, models, health, metrics and the API key."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gpt2onnx.runtime import Model
from gpt2onnx.runtime.generator import Generator
from gpt2onnx.serve import Engine, EngineConfig
from tests.serve.helpers import MODEL_NAME, make_app, parse_sse, slow_steps, stream_text

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(module_engine: Engine) -> Iterator[TestClient]:
    with TestClient(make_app(module_engine)) as c:
        yield c


def test_completion_response_shape(client: TestClient, greedy_text: Callable[..., str]) -> None:
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello there",
                                             "max_tokens": 7, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL_NAME and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "length",
                                "text": greedy_text("Hello there", 7, stop_on_eos=False)}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}


def test_default_max_tokens_is_16(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hi", **GREEDY})
    assert r.json()["usage"]["completion_tokens"] == 16


def test_stream_chunks_then_usage_then_done(client: TestClient) -> None:
    payload = {"prompt": "Once upon a time", "max_tokens": 12, **GREEDY}
    whole = client.post("/v1/completions", json=payload).json()
    r = client.post("/v1/completions", json={**payload, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks, done = parse_sse(r.text)
    assert done
    *text_chunks, usage_chunk = chunks
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion"
               for c in chunks)
    assert all(len(c["choices"]) == 1 and c["usage"] is None for c in text_chunks)
    assert stream_text(text_chunks) == whole["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_stream_without_usage_has_no_usage_chunk(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True,
                                             **GREEDY})
    chunks, done = parse_sse(r.text)
    assert done and all(c["choices"] and "usage" not in c for c in chunks)


def test_echo_stop_and_token_id_prompts(client: TestClient, ref_model: Model,
                                        greedy_text: Callable[..., str]) -> None:
    ids = ref_model.encode("The weather today")
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "echo": True,
                                             **GREEDY}).json()
    assert r["choices"][0]["text"] == "The weather today" + greedy_text(
        ids, 5, stop_on_eos=False)
    assert r["usage"]["prompt_tokens"] == len(ids)

    full = greedy_text("Hello there", 12, stop_on_eos=False)
    stop = full[len(full) // 2:][:3]
    r = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 12,
                                             "stop": [stop], **GREEDY}).json()
    assert r["choices"][0] == {"index": 0, "text": full[:full.index(stop)], "logprobs": None,
                               "finish_reason": "stop"}


def test_n_and_prompt_lists_index_choices(client: TestClient,
                                          greedy_text: Callable[..., str]) -> None:
    r = client.post("/v1/completions", json={"prompt": ["A cat", "A dog"], "n": 2,
                                             "max_tokens": 4, **GREEDY}).json()
    texts = [c["text"] for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    cat, dog = (greedy_text(p, 4, stop_on_eos=False) for p in ("A cat", "A dog"))
    assert texts == [cat, cat, dog, dog]
    assert r["usage"]["completion_tokens"] == 16

    sampled = {"prompt": "A cat", "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 3}
    first = client.post("/v1/completions", json=sampled).json()["choices"]
    second = client.post("/v1/completions", json=sampled).json()["choices"]
    assert first == second and len({c["text"] for c in first}) > 1


def test_logprobs_in_openai_shape(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4,
                                             "logprobs": 2, **GREEDY}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"][1:] == [sum(map(len, lp["tokens"][:i])) for i in range(1, 4)]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                   strict=True):
        assert 1 <= len(top) <= 3 and top[token] == logprob  # the sampled token is listed
        assert max(top.values()) == pytest.approx(logprob)  # greedy picked the argmax

    streamed = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4,
                                                    "logprobs": 2, "stream": True, **GREEDY})
    chunks, _ = parse_sse(streamed.text)
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == lp["tokens"] and offsets == lp["text_offset"]


def test_models_health_and_metrics(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == MODEL_NAME and models["data"][0]["max_model_len"] == 128
    assert client.get("/health").json() == {"status": "ok"}
    client.post("/v1/completions", json={"prompt": "Count me", "max_tokens": 3, **GREEDY})
    client.post("/v1/completions", json={"prompt": "", "max_tokens": 3})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    values = {}
    for line in metrics.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['gpt2onnx_requests_total{outcome="success"}'] >= 1
    assert values['gpt2onnx_requests_total{outcome="bad_request"}'] >= 1
    assert values["gpt2onnx_prompt_tokens_total"] >= 2
    assert values["gpt2onnx_generation_tokens_total"] >= 3
    for name in ("gpt2onnx_queue_depth", "gpt2onnx_running_batch_size",
                 "gpt2onnx_time_to_first_token_seconds_count",
                 "gpt2onnx_time_per_output_token_seconds_count"):
        assert name in values


def test_unknown_routes_and_models_answer_in_the_openai_shape(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param",
                                                               "code"}
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "Hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_api_key(module_engine: Engine) -> None:
    with TestClient(make_app(module_engine, api_key="s3cret")) as c:
        payload = {"prompt": "Hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            r = c.post("/v1/completions", json=payload, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/completions", json=payload, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key
        assert c.get("/metrics").status_code == 200


def test_health_is_503_until_the_model_is_loaded(tiny_fused: Path) -> None:
    release = threading.Event()

    def slow_load() -> Model:
        release.wait(30)
        return Model(tiny_fused)

    engine = Engine(slow_load, EngineConfig(max_batch_size=2))
    app = make_app(engine)
    try:
        engine.start()
        with TestClient(app) as c:
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = c.post("/v1/completions", json={"prompt": "Hi"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
            release.set()
            assert engine.wait_ready(30)
            assert c.get("/health").status_code == 200
    finally:
        release.set()
        engine.stop(drain_timeout=0)


def test_health_reports_a_failed_load(tmp_path: Path) -> None:
    engine = Engine(lambda: Model(tmp_path / "missing"), EngineConfig())
    with TestClient(make_app(engine)) as c:
        engine.start()
        with pytest.raises(Exception, match="does not exist"):
            engine.wait_ready(30)
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "does not exist" in r.json()["error"]
    # With an API key, the reason (it names paths) is for the key's holder only.
    with TestClient(make_app(engine, api_key="sekret")) as c:
        assert c.get("/health").json() == {"status": "failed"}
        r = c.get("/health", headers={"Authorization": "Bearer sekret"})
        assert "does not exist" in r.json()["error"]


def test_timeouts_and_failed_runs_answer_in_the_error_shape(
        make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    slow_steps(monkeypatch, 0.01)
    engine = make_engine(max_batch_size=2, request_timeout=0.3)
    with TestClient(make_app(engine)) as c:
        long = {"prompt": "Slow", "max_tokens": 100, **GREEDY}
        r = c.post("/v1/completions", json=long)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        # A stream that already started (status 200) ends with an error event, then [DONE].
        chunks, done = parse_sse(c.post("/v1/completions", json={**long, "stream": True}).text)
        assert done and chunks[-1]["error"]["type"] == "timeout_error"
        assert "text" in chunks[0]["choices"][0]

        def broken(self: Generator) -> None:
            raise RuntimeError("injected fault")

        monkeypatch.setattr(Generator, "generate_next_token", broken)
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, **GREEDY})
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "model_run_failed"
        assert "injected fault" in r.json()["error"]["message"]
        monkeypatch.undo()
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, **GREEDY})
        assert r.status_code == 200  # the server kept serving


def test_stream_with_n_interleaves_choices(client: TestClient,
                                           greedy_text: Callable[..., str]) -> None:
    r = client.post("/v1/completions", json={"prompt": "Two ways", "n": 2, "max_tokens": 6,
                                             "stream": True, **GREEDY})
    chunks, done = parse_sse(r.text)
    expected = greedy_text("Two ways", 6, stop_on_eos=False)
    assert done and stream_text(chunks, 0) == stream_text(chunks, 1) == expected
    finals = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1]


def test_echo_with_logprobs_scores_the_prompt(client: TestClient, ref_model: Model) -> None:
    """OpenAI's legacy scoring call (what lm-evaluation-harness sends): the prompt's tokens
    with their log-probs first, token_logprobs[0] and top_logprobs[0] null, then the
    generated ones; top_logprobs always contain the chosen token."""
    text = "The weather today is"
    ids = ref_model.encode(text)
    scored = ref_model.score(ids, top_logprobs=2)
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 2, "echo": True,
                                             "logprobs": 2, **GREEDY})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 2
    assert "".join(lp["tokens"][:len(ids)]) == text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for got, want in zip(lp["token_logprobs"][1:len(ids)], scored.logprobs[1:], strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    for token, top, logprob in zip(lp["tokens"][1:], lp["top_logprobs"][1:],
                                   lp["token_logprobs"][1:], strict=True):
        assert top[token] == pytest.approx(logprob) and len(top) in (2, 3)
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    assert lp["text_offset"][len(ids)] == len(text)  # generated tokens follow the prompt
    assert choice["text"].startswith(text)


def test_max_tokens_zero_with_echo_scores_without_generating(client: TestClient,
                                                            ref_model: Model) -> None:
    ids = ref_model.encode("Scoring only, please")
    r = client.post("/v1/completions", json={"prompt": [ids, ids[:3]], "max_tokens": 0,
                                             "echo": True, "logprobs": 0, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 0
    for choice, prompt in zip(body["choices"], (ids, ids[:3]), strict=True):
        assert choice["text"] == ref_model.decode(prompt)
        assert len(choice["logprobs"]["token_logprobs"]) == len(prompt)
        expected = ref_model.score(prompt).logprobs
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(expected[1:],
                                                                         abs=1e-5)


def test_vllm_prompt_logprobs_field(client: TestClient, ref_model: Model) -> None:
    ids = ref_model.encode("A short prompt here")
    scored = ref_model.score(ids, top_logprobs=1)
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1,
                                             "prompt_logprobs": 1, **GREEDY})
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for entry, token, want, top in zip(entries[1:], ids[1:], scored.logprobs[1:],
                                       scored.top_logprobs[1:], strict=True):
        assert entry[str(token)]["logprob"] == pytest.approx(want, abs=1e-5)
        assert entry[str(top[0][0])]["rank"] == 1
        assert entry[str(token)]["rank"] >= 1


def test_streamed_echo_with_logprobs(client: TestClient, ref_model: Model) -> None:
    ids = ref_model.encode("Streaming the scores")
    chunks, _ = parse_sse(client.post("/v1/completions", json={
        "prompt": ids, "max_tokens": 3, "echo": True, "logprobs": 1, "stream": True,
        **GREEDY}).text)
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    logprobs = [t for c in chunks for t in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert len(tokens) == len(ids) + 3 and logprobs[0] is None
    assert logprobs[1:len(ids)] == pytest.approx(ref_model.score(ids).logprobs[1:], abs=1e-5)


def test_new_sampling_fields_reach_the_sampler(client: TestClient, ref_model: Model) -> None:
    """min_p, frequency/presence penalties and min_tokens over HTTP give what the Python
    API gives for the same parameters and seed."""
    from gpt2onnx.runtime import GenerationParams

    fields = {"temperature": 0.9, "min_p": 0.05, "frequency_penalty": 0.5,
              "presence_penalty": 0.3, "min_tokens": 4, "seed": 7}
    r = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 8,
                                             **fields})
    assert r.status_code == 200, r.text
    expected = ref_model.generate("Hello there", GenerationParams(max_new_tokens=8, **fields))
    assert r.json()["choices"][0]["text"] == expected.text
