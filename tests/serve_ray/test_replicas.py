"""The server as two Ray Serve replicas on a local one-machine cluster (2 CPUs): the same
routes, answers and errors as the single-machine server; requests spread over replicas;
Serve's queue bound answers 503; a killed replica is replaced and no client hangs."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed; "
                          "`pip install 'gpt2onnx[ray]'` enables the multi-replica tests")
serve = pytest.importorskip("ray.serve", reason="`pip install 'gpt2onnx[ray]'`")

from gpt2onnx.runtime import Model  # noqa: E402
from gpt2onnx.serve import Engine, EngineConfig, create_app  # noqa: E402
from gpt2onnx.serve.ray.deployment import (  # noqa: E402
    DEPLOYMENT_NAME,
    REPLICA_HEADER,
    build_app,
)

APP = "gpt2onnx-test"
MODEL_NAME = "tiny"
BATCH = 4  # slots per replica, and so requests in flight per replica
QUEUED = 16  # Serve's queue bound: a 17th waiting request gets 503
GREEDY = {"temperature": 0, "ignore_eos": True}
ARGS = {"served_model_name": MODEL_NAME, "replicas": 2, "num_cpus_per_replica": 1,
        "max_batch_size": BATCH, "max_queued_requests": QUEUED, "shutdown_timeout": 5}


@pytest.fixture(scope="module")
def url(tiny_fused: Path) -> Iterator[str]:
    """The proxy URL of the app, two replicas over ``tiny_fused``."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with socket.socket() as probe:  # a free port for Serve's proxy
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model_dir": str(tiny_fused), **ARGS}), name=APP,
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ref_model(tiny_fused: Path) -> Model:
    return Model(tiny_fused)


def greedy(model: Model, prompt: str, max_tokens: int) -> str:
    return model.generate(prompt, max_new_tokens=max_tokens, stop_on_eos=False).text


def sse_text(body: str) -> tuple[str, bool]:
    """(the streamed text of choice 0, whether the stream ended with [DONE])."""
    text, done = [], False
    for line in body.splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            text += [c["text"] for c in json.loads(line[6:])["choices"] if c["index"] == 0]
    return "".join(text), done


def running_replicas() -> int:
    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return 0
    return app.deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0)


def replica_actor(replica_id: str) -> Any:
    # Serve names each replica's actor after its app, deployment and id.
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.constants import SERVE_NAMESPACE

    name = ReplicaID(replica_id, DeploymentID(DEPLOYMENT_NAME, APP)).to_full_id_str()
    return ray.get_actor(name, namespace=SERVE_NAMESPACE)


def test_routes_answer_as_the_single_machine_server_does(url: str, ref_model: Model) -> None:
    from openai import OpenAI

    health = httpx.get(f"{url}/health", timeout=30)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert health.headers[REPLICA_HEADER]
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30, max_retries=0)
    answer = client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                       max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert answer.choices[0].text == greedy(ref_model, "Once upon a time", 12)
    assert answer.usage is not None and answer.usage.completion_tokens == 12

    payload = {"prompt": "The river", "max_tokens": 20, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text, done = sse_text(r.read().decode())
    assert done and text == greedy(ref_model, "The river", 20)


BAD_REQUESTS: list[dict[str, Any] | bytes] = [
    {"prompt": "Hi", "max_tokens": -1},
    {"prompt": "Hi", "temperature": -1},
    {"prompt": "Hi", "top_p": 1.5},
    {"prompt": "Hi", "n": EngineConfig().max_choices + 1},
    {"max_tokens": 4},
    {"prompt": "Hi", "model": "not-this-one"},
    {"prompt": "word " * 200, "max_tokens": 4},
    b"{not json",
]


def test_bad_input_gets_the_single_machine_servers_status_and_error(
        url: str, tiny_fused: Path) -> None:
    engine = Engine(lambda: Model(tiny_fused), EngineConfig(max_batch_size=BATCH))
    assert engine.start().wait_ready(timeout=60)
    local = create_app(engine, model_name=MODEL_NAME, manage_engine=False)

    async def both(request: dict[str, Any] | bytes) -> tuple[httpx.Response, httpx.Response]:
        kwargs: dict[str, Any] = ({"content": request, "headers": {
            "content-type": "application/json"}} if isinstance(request, bytes)
            else {"json": request})
        transport = httpx.ASGITransport(app=local)
        async with httpx.AsyncClient(transport=transport, base_url="http://local") as one, \
                httpx.AsyncClient(timeout=30) as ray_client:
            return (await one.post("/v1/completions", **kwargs),
                    await ray_client.post(f"{url}/v1/completions", **kwargs))

    try:
        for request in BAD_REQUESTS:
            single, replicated = asyncio.run(both(request))
            assert 400 <= single.status_code < 500, request
            assert replicated.status_code == single.status_code, request
            assert replicated.json() == single.json(), request
    finally:
        engine.stop(drain_timeout=0)


async def post_all(url: str, payloads: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(payloads))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=p)
                                      for p in payloads))


def test_concurrent_requests_are_spread_across_replicas(url: str, ref_model: Model) -> None:
    # Three times what one replica takes at once (and within Serve's queue bound): Serve
    # must use both.
    payloads = [{"prompt": f"Request {i} says", "max_tokens": 24, **GREEDY}
                for i in range(3 * BATCH)]
    responses = asyncio.run(post_all(url, payloads))
    for payload, r in zip(payloads, responses, strict=True):
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == greedy(ref_model, payload["prompt"], 24)
    served = Counter(r.headers[REPLICA_HEADER] for r in responses)
    print(f"requests per replica: {dict(served)}")
    assert len(served) == 2 and min(served.values()) >= 2, served


def test_past_serves_queue_bound_requests_get_503_and_the_rest_answers(url: str) -> None:
    # 2 replicas x 4 in flight + 16 queued take 24; the other 36 are refused at once.
    payloads = [{"prompt": f"Flood {i}", "max_tokens": 100, **GREEDY} for i in range(60)]
    started = time.monotonic()
    statuses = Counter(r.status_code for r in asyncio.run(post_all(url, payloads)))
    print(f"statuses: {dict(statuses)} in {time.monotonic() - started:.1f} s")
    assert set(statuses) <= {200, 503} and statuses[200] >= 2 * BATCH and statuses[503] > 0


async def stream_outcome(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                         streaming: asyncio.Future[str] | None = None) -> tuple[str, str]:
    """(the replica that answered or "", "done" or "error <what>"); ``streaming`` gets the
    replica's id with the first chunk."""
    replica = ""
    try:
        async with client.stream("POST", f"{url}/v1/completions",
                                 json={**payload, "stream": True}) as r:
            replica = r.headers.get(REPLICA_HEADER, "")
            if r.status_code != 200:
                return replica, f"error {r.status_code}"
            body = []
            async for line in r.aiter_lines():
                body.append(line)
                if streaming is not None and not streaming.done() and line.startswith("data"):
                    streaming.set_result(replica)
            _, done = sse_text("\n".join(body))
            return replica, "done" if done else "error truncated"
    except httpx.HTTPError as exc:
        return replica, f"error {type(exc).__name__}"


async def outcome(client: httpx.AsyncClient, url: str, payload: dict[str, Any]
                  ) -> tuple[str, str]:
    """``stream_outcome`` without streaming."""
    try:
        r = await client.post(f"{url}/v1/completions", json=payload)
    except httpx.HTTPError as exc:
        return "", f"error {type(exc).__name__}"
    result = "done" if r.status_code == 200 else f"error {r.status_code}"
    return r.headers.get(REPLICA_HEADER, ""), result


def test_a_killed_replica_is_replaced_and_no_client_hangs(url: str) -> None:
    long = {"prompt": "Keep going", "max_tokens": 120, "n": BATCH, **GREEDY}

    async def run() -> tuple[str, tuple[str, str], list[tuple[str, str]]]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30),
                                     limits=httpx.Limits(max_connections=16)) as client:
            # Background load on both replicas while one dies, streamed and not.
            load = [asyncio.ensure_future(stream_outcome(client, url, {
                "prompt": f"Load {i}", "max_tokens": 60, **GREEDY})) for i in range(3)]
            load += [asyncio.ensure_future(outcome(client, url, {
                "prompt": f"Load {i}", "max_tokens": 100, **GREEDY})) for i in range(4)]
            streaming: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            victim_stream = asyncio.ensure_future(stream_outcome(client, url, long, streaming))
            victim = await asyncio.wait_for(streaming, 30)  # mid-stream from here on
            await asyncio.to_thread(ray.kill, replica_actor(victim), no_restart=True)
            # Bounded: every client ends, with an answer or an error, well within this.
            outcomes = await asyncio.wait_for(asyncio.gather(victim_stream, *load), 60)
            return victim, outcomes[0], list(outcomes[1:])

    victim, killed_stream, load = asyncio.run(run())
    print(f"killed {victim}: its stream {killed_stream[1]}; "
          f"the others {Counter(o for _, o in load)}: {load}")
    # An answer, or the failure of a server (a cut stream, a 5xx), never the client's fault.
    assert all(o == "done" or not o.startswith("error 4") for _, o in [killed_stream, *load])
    # Serve starts a replacement; the app serves from two replicas again.
    deadline = time.monotonic() + 90
    while running_replicas() < 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica in 90 s"
        time.sleep(0.5)
    # The proxy learns of the new replica shortly after it runs: ask until both answer.
    served: set[str] = set()
    while len(served) < 2:
        assert time.monotonic() < deadline, f"only {served} answered after the replacement"
        payloads = [{"prompt": f"After {i}", "max_tokens": 8, **GREEDY}
                    for i in range(2 * BATCH)]
        responses = asyncio.run(post_all(url, payloads))
        assert all(r.status_code == 200 for r in responses)
        served |= {r.headers[REPLICA_HEADER] for r in responses}
    assert victim not in served
