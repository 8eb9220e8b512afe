"""The server against operators and hostile or careless clients: SIGTERM with more in
flight than the drain allows, a folder that cannot load, slow and piled-up connections,
disconnects, malformed JSON, Host/Origin/Content-Type checks, and a hard queue limit."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from gpt2onnx.serve import Engine
from gpt2onnx.serve.__main__ import allowed_hosts, main, parse_args
from tests.serve.helpers import (
    SLOW_SERVER,
    LiveServer,
    free_port,
    healthy,
    make_app,
    parse_sse,
    slow_steps,
    wait_until,
)


class CLIServer:
    """``python -m gpt2onnx.serve`` in a subprocess (decode steps slowed to 20 ms), with
    its stderr kept in a file."""

    def __init__(self, folder: Path, tmp: Path, *flags: str, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_SERVER, str(folder), "--port", str(self.port),
             *flags], stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            assert wait_until(lambda: healthy(self.url) or self.proc.poll() is not None,
                              timeout=60), "the server did not become healthy"
            assert self.proc.poll() is None, self.log.read_text()

    def text(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture
def cli_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[CLIServer] = []

    def start(folder: Path, *flags: str, wait: bool = True) -> CLIServer:
        servers.append(CLIServer(folder, tmp_path, *flags, wait=wait))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _metric(url: str, outcome: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    line = f'gpt2onnx_requests_total{{outcome="{outcome}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


# ---- shutdown ---------------------------------------------------------------------------

def test_sigterm_answers_what_cannot_finish_with_503_and_ends_streams(
        tiny_fused: Path, cli_server: Any) -> None:
    server = cli_server(tiny_fused, "--max-batch-size", "1", "--shutdown-timeout", "0.5",
                        "--log-level", "warning")
    long = {"prompt": "Until the end", "max_tokens": 100, "temperature": 0,
            "ignore_eos": True}
    answers: list[httpx.Response] = []

    def queued() -> None:
        answers.append(httpx.post(f"{server.url}/v1/completions", json=long, timeout=60))

    with httpx.stream("POST", f"{server.url}/v1/completions", json={**long, "stream": True},
                      timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        waiting = [threading.Thread(target=queued) for _ in range(3)]
        for t in waiting:
            t.start()
        assert wait_until(lambda: "gpt2onnx_queue_depth 3.0" in httpx.get(
            f"{server.url}/metrics").text, timeout=10)
        server.proc.send_signal(signal.SIGTERM)
        body = "\n".join([first, *lines])
    for t in waiting:
        t.join(timeout=30)
    chunks, done = parse_sse(body)
    assert done, "the stream ends with data: [DONE]"
    assert chunks[-1]["error"]["code"] == "shutting_down", chunks[-1]
    assert len(answers) == 3
    for a in answers:
        assert a.status_code == 503, a.text
        assert a.headers["content-type"] == "application/json"
        assert a.json()["error"]["code"] == "shutting_down"
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.text()


def test_a_folder_that_fails_to_load_exits_non_zero_with_the_reason(
        tiny_fused: Path, tmp_path: Path, cli_server: Any) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_fused, broken)
    graph = next(p for p in broken.iterdir() if p.suffix == ".onnx")
    with graph.open("ab") as f:  # the manifest still names it; its hash no longer matches
        f.write(b"tampered")
    server = cli_server(broken, wait=False)
    assert server.proc.wait(timeout=60) == 1
    out = server.text()
    assert "could not be loaded" in out and graph.name in out
    assert "Traceback" not in out


# ---- slow and piled-up connections ------------------------------------------------------

def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        pass
    return data


def test_slow_headers_are_cut_and_the_connection_limit_holds(tiny_fused: Path,
                                                             cli_server: Any) -> None:
    server = cli_server(tiny_fused, "--header-timeout", "1", "--max-connections", "6",
                        "--log-level", "warning")
    socks = []
    for _ in range(12):  # slowloris: headers that never end
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
        time.sleep(0.02)
    # Over the limit: answered 503 at once and closed.
    extra = [_read_all(s) for s in socks[6:]]
    assert all(b" 503 " in e.split(b"\r\n")[0] and b"too_many_connections" in e for e in extra)
    # Within it: a trickle of bytes does not keep the connection past the header deadline.
    start = time.monotonic()
    for _ in range(3):
        for s in socks[:6]:
            s.sendall(b"X-Slow: 1\r\n")
        time.sleep(0.2)
    held = [_read_all(s) for s in socks[:6]]
    assert time.monotonic() - start < 5
    assert all(b" 408 " in h.split(b"\r\n")[0] for h in held), held
    for s in socks:
        s.close()
    # The server serves normally afterwards and logged no tracebacks.
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    assert "Traceback" not in server.text() and len(server.text()) < 20_000


def test_a_body_that_trickles_in_gets_408(module_engine: Engine) -> None:
    server = LiveServer(make_app(module_engine, body_timeout=0.5))
    try:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                      b'{"prompt": ')
            reply = _read_all(s)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b" 408 " in head.split(b"\r\n")[0]
        assert json.loads(body)["error"]["code"] == "body_timeout"
    finally:
        server.close()


# ---- disconnects ------------------------------------------------------------------------

def test_clients_that_leave_early_are_counted_and_log_nothing(tiny_fused: Path,
                                                              cli_server: Any) -> None:
    server = cli_server(tiny_fused, "--max-batch-size", "2", "--log-level", "info")
    before = _metric(server.url, "cancelled")
    payload = {"prompt": "Leaving", "max_tokens": 100, "ignore_eos": True}

    async def leave(i: int) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{server.url}/v1/completions"
            if i % 2:  # a stream read for a moment, then dropped
                async with client.stream("POST", url, json={**payload, "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        break
            else:  # waiting for the whole answer, given up on (some before they start)
                with pytest.raises(httpx.TimeoutException):
                    await client.post(url, json=payload, timeout=0.1 + 0.02 * i)

    async def run() -> None:
        await asyncio.gather(*(leave(i) for i in range(12)))

    asyncio.run(run())
    assert wait_until(lambda: _metric(server.url, "cancelled") - before == 12, timeout=20)
    log = server.text()
    assert "InvalidStateError" not in log and "Traceback" not in log, log[-3000:]
    assert wait_until(lambda: "gpt2onnx_running_batch_size 0.0" in httpx.get(
        f"{server.url}/metrics").text, timeout=10)


# ---- malformed requests -----------------------------------------------------------------

@pytest.fixture(scope="module")
def client(module_engine: Engine) -> Iterator[TestClient]:
    with TestClient(make_app(module_engine)) as c:
        yield c


def _bad_requests(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('gpt2onnx_requests_total{outcome="bad_request"}'):
            return float(line.split()[-1])
    raise AssertionError("no bad_request counter")


@pytest.mark.parametrize("raw, needle", [
    ('{"prompt": "\\ud800 x", "max_tokens": 2}', "lone UTF-16 surrogate"),
    ('{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt.1"),
    ('{"prompt": "Hi", "stop": ["\\ud83d"]}', "stop.0"),
    ('{"prompt": "Hi", "x": ' + "[" * 1000 + "]" * 1000 + "}", "levels"),
    ('{"prompt": "Hi", "x": ' + "[" * 100 + "]" * 100 + "}", "levels"),
    ('{"prompt": "Hi", "\\ud800": 1}', "surrogate"),
], ids=["surrogate", "surrogate in a list", "half a pair", "1000 deep", "100 deep",
        "surrogate key"])
def test_malformed_json_is_a_counted_400(client: TestClient, raw: str, needle: str) -> None:
    before = _bad_requests(client)
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        r = client.post(path, content=raw.encode(),
                        headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        assert needle in r.json()["error"]["message"], r.text
    assert _bad_requests(client) - before == 3


def test_unknown_paths_and_our_own_bugs_answer_in_the_openai_shape(
        module_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import gpt2onnx.serve.app as app_module

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(app_module, "parse_completion", broken)
    with TestClient(make_app(module_engine), raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "internal_error"
        assert "ZeroDivisionError" in r.json()["error"]["message"]
        errors = next(x for x in c.get("/metrics").text.splitlines()
                      if x.startswith('gpt2onnx_requests_total{outcome="error"}'))
        assert float(errors.split()[-1]) >= 1
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()


# ---- browsers: Host, Origin, Content-Type -----------------------------------------------

@pytest.fixture(scope="module")
def guarded(module_engine: Engine) -> Iterator[TestClient]:
    app = make_app(module_engine, allowed_hosts=["127.0.0.1", "localhost"],
                   allowed_origins=["https://app.example"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        yield c


def test_a_foreign_host_is_refused(guarded: TestClient) -> None:
    r = guarded.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                     headers={"host": "rebind.attacker.example:8000"})
    assert r.status_code == 421
    assert "--allowed-hosts rebind.attacker.example" in r.json()["error"]["message"]
    assert guarded.get("/health", headers={"host": "localhost:8000"}).status_code == 200


def test_foreign_origins_are_refused_and_allowed_ones_get_cors(guarded: TestClient) -> None:
    body = {"prompt": "Hi", "max_tokens": 1}
    r = guarded.post("/v1/completions", json=body, headers={"origin": "https://evil.example"})
    assert r.status_code == 403
    assert "--allowed-origins https://evil.example" in r.json()["error"]["message"]
    assert guarded.post("/v1/completions", json=body,
                        headers={"origin": "null"}).status_code == 403
    # The server's own pages (the playground) are same-origin.
    assert guarded.post("/v1/completions", json=body,
                        headers={"origin": "http://127.0.0.1:8000"}).status_code == 200
    # An allowed origin: preflight answered, and the reply carries CORS headers.
    pre = guarded.options("/v1/completions", headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, authorization"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    r = guarded.post("/v1/completions", json=body, headers={"origin": "https://app.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    # A preflight from elsewhere is refused.
    assert guarded.options("/v1/completions", headers={
        "origin": "https://evil.example",
        "access-control-request-method": "POST"}).status_code == 403


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_only_json_bodies(guarded: TestClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = guarded.post("/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 1}',
                     headers=headers)
    assert r.status_code == 415
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    ok = guarded.post("/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 1}',
                      headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_cli_host_defaults() -> None:
    hosts, any_ip = allowed_hosts(parse_args(["m"]))
    assert set(hosts) == {"127.0.0.1", "localhost", "::1"} and not any_ip
    hosts, any_ip = allowed_hosts(parse_args(["m", "--host", "0.0.0.0",
                                              "--allowed-hosts", "api.example, other"]))
    assert any_ip and {"api.example", "other", "localhost"} <= set(hosts)
    hosts, _ = allowed_hosts(parse_args(["m", "--host", "10.1.2.3"]))
    assert "10.1.2.3" in hosts


@pytest.mark.parametrize("flags, param", [
    (["--header-timeout", "0"], "header_timeout"),
    (["--body-timeout", "nan"], "body_timeout"),
    (["--max-connections", "0"], "max_connections"),
    (["--allowed-origins", "app.example"], "allowed_origins"),
    (["--allowed-hosts", " , "], "allowed_hosts"),
])
def test_bad_server_flags_exit_2(tiny_fused: Path, capsys: pytest.CaptureFixture[str],
                                 flags: list[str], param: str) -> None:
    assert main([str(tiny_fused), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "--" + param.replace("_", "-") in err


# ---- the queue limit --------------------------------------------------------------------

def test_the_queue_limit_is_hard_under_a_burst(make_engine: Any, live_server: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    slow_steps(monkeypatch, 0.05)
    engine = make_engine(max_batch_size=2, max_queue=3)
    server = live_server(engine)
    payload = {"prompt": "Burst", "max_tokens": 40, "ignore_eos": True}

    async def one(client: httpx.AsyncClient) -> int:
        return (await client.post(f"{server.url}/v1/completions", json=payload)).status_code

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client) for _ in range(20)))

    codes = asyncio.run(burst())
    assert codes.count(200) == 5 and codes.count(429) == 15, codes
