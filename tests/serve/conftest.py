"""Serving fixtures: engines over the tiny fused folder, the app in-process, and a real
uvicorn server on 127.0.0.1 (a free port) for streaming, disconnects and overload."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpt2onnx.runtime import Model
from gpt2onnx.serve import Engine, EngineConfig
from tests.serve.helpers import LiveServer, make_app


@pytest.fixture(scope="session")
def ref_model(tiny_fused: Path) -> Model:
    """A second Model on the same folder: the single-run reference outputs."""
    return Model(tiny_fused)


@pytest.fixture(scope="session")
def greedy_text(ref_model: Model) -> Callable[..., str]:
    """greedy_text(prompt, max_tokens, **params): what one greedy run alone produces."""
    cache: dict[tuple, str] = {}

    def run(prompt: str | list[int], max_tokens: int, **params: Any) -> str:
        key = (str(prompt), max_tokens, tuple(sorted(params.items())))
        if key not in cache:
            cache[key] = ref_model.generate(prompt, max_new_tokens=max_tokens, **params).text
        return cache[key]

    return run


@pytest.fixture
def make_engine(tiny_fused: Path) -> Iterator[Callable[..., Engine]]:
    """make_engine(folder=tiny_fused, **EngineConfig fields) -> a started, ready engine
    (stopped at the end of the test), its model loaded as the server does (the mixed
    graph unless ``mixed_runs=False``)."""
    made: list[Engine] = []

    def make(folder: Path = tiny_fused, **config: Any) -> Engine:
        settings = EngineConfig(**config)
        engine = Engine(lambda: Model(folder, mixed=settings.mixed_runs), settings)
        made.append(engine)
        assert engine.start().wait_ready(timeout=60)
        return engine

    yield make
    for engine in made:
        engine.stop(drain_timeout=0)


@pytest.fixture(scope="module")
def module_engine(tiny_fused: Path) -> Iterator[Engine]:
    engine = Engine(lambda: Model(tiny_fused, mixed=True), EngineConfig(max_batch_size=8))
    assert engine.start().wait_ready(timeout=60)
    yield engine
    engine.stop(drain_timeout=0)


@pytest.fixture
def live_server() -> Iterator[Callable[..., LiveServer]]:
    """live_server(engine, **create_app kwargs) -> a running LiveServer (closed after)."""
    servers: list[LiveServer] = []

    def start(engine: Engine, **kwargs: Any) -> LiveServer:
        server = LiveServer(make_app(engine, **kwargs))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
