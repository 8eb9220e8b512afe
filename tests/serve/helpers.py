"""Helpers shared by the serving tests."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from gpt2onnx.runtime.generator import Generator
from gpt2onnx.serve import Engine, create_app

MODEL_NAME = "tiny"


def make_app(engine: Engine, **kwargs: Any) -> FastAPI:
    return create_app(engine, model_name=MODEL_NAME, manage_engine=False, **kwargs)


class LiveServer:
    """uvicorn on a thread, on a socket bound to 127.0.0.1:0 before it starts."""

    def __init__(self, app: FastAPI) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "uvicorn did not stop in 15 s"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` (bounded); True once it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def parse_sse(body: str) -> tuple[list[dict[str, Any]], bool]:
    """SSE text -> (the JSON chunks, whether it ended with data: [DONE])."""
    chunks, done = [], False
    for line in body.splitlines():
        if not line.startswith("data: "):
            continue
        assert not done, "nothing may follow data: [DONE]"
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
        else:
            chunks.append(json.loads(data))
    return chunks, done


def stream_text(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(c["text"] for chunk in chunks for c in chunk["choices"] if c["index"] == index)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def slow_steps(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make every decode step take at least ``seconds`` (the tiny model is too fast to
    observe queueing and deadlines)."""
    original = Generator.generate_next_token

    def slow(self: Generator) -> np.ndarray:
        time.sleep(seconds)
        return original(self)

    monkeypatch.setattr(Generator, "generate_next_token", slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The CLI in a subprocess, with decode steps slowed so a stream is still running when
# SIGTERM arrives.
SLOW_SERVER = """
import sys, time
from gpt2onnx.runtime.generator import Generator
original = Generator.generate_next_token
def slow(self):
    time.sleep(0.02)
    return original(self)
Generator.generate_next_token = slow
from gpt2onnx.serve.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
