"""The server as a Ray Serve deployment: each replica owns one ``Engine`` (its own
session, IOBinding and KV buffers) and answers HTTP with the single-machine server's app
(``create_app``), so routes, validation and errors are the same code, not a copy.

The only module of the package that imports Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

try:
    import ray
    from ray import serve
    from ray.serve import Application
except ImportError as exc:  # the rest of the package works without the extra
    raise ImportError("Ray Serve is not installed; install the extra with "
                      "`pip install 'gpt2onnx[ray]'`.") from exc
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from gpt2onnx.runtime.folder import open_manifest
from gpt2onnx.runtime.model import Model
from gpt2onnx.serve.app import create_app
from gpt2onnx.serve.engine import Engine, server_spinning
from gpt2onnx.serve.ray.config import ReplicaConfig, ScalingConfig, configs_from_args

DEPLOYMENT_NAME = "gpt2onnx"
# Names the replica that answered, on every response: which replica served a request is
# otherwise invisible behind Serve's proxy.
REPLICA_HEADER = "x-gpt2onnx-replica"


class ReplicaASGI:
    """The ASGI app Serve's ingress wraps: it hands each request to the app of the replica
    it runs in.

    ``serve.ingress`` takes one app when the class is defined, before any replica (and so
    any engine) exists, and each replica gets a copy; that copy finds its replica's
    ``create_app`` app through Serve's replica context at the first request. The engine's
    life is the replica's (constructor, ``__del__``), so the lifespan protocol is only
    acknowledged here.
    """

    def __init__(self) -> None:
        self._replica: EngineReplica | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _acknowledge_lifespan(receive, send)
            return
        if self._replica is None:
            self._replica = serve.get_replica_context().servable_object
        replica = self._replica
        assert replica is not None, "a request reached a replica before its constructor ran"
        header = (REPLICA_HEADER.encode(), replica.replica_id.encode())

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await replica.http_app(scope, receive, send_with_replica)


async def _acknowledge_lifespan(receive: Receive, send: Send) -> None:
    while True:
        kind = (await receive())["type"]  # lifespan.startup, then lifespan.shutdown
        await send({"type": f"{kind}.complete"})
        if kind == "lifespan.shutdown":
            return


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(ReplicaASGI())
class EngineReplica:
    """One replica: loads the model in its constructor, so Serve routes to it only once
    the engine is ready, and a folder that fails to load fails the deployment with the
    loader's message.

    Args:
        config: what to load and how to answer (see ``ReplicaConfig``).
    """

    def __init__(self, config: ReplicaConfig) -> None:
        # As in the single-machine server: the engine thread gets the GIL back after each
        # model run sooner than the default 5 ms switch interval would let it.
        sys.setswitchinterval(0.001)
        self.replica_id: str = serve.get_replica_context().replica_id.unique_id
        self.engine = Engine(lambda: Model(config.model_dir, provider=config.provider,
                                           threads=config.threads,
                                           spinning=server_spinning(
                                               config.spinning, config.engine.speculative),
                                           mixed=config.engine.mixed_runs), config.engine)
        self.engine.start().wait_ready()  # re-raises a load failure
        self.http_app: FastAPI = create_app(
            self.engine, model_name=config.model_name, api_key=config.api_key,
            max_body_bytes=config.max_body_bytes, drain_timeout=config.drain_timeout,
            manage_engine=False)

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine thread died is replaced."""
        if not self.engine.ready:
            raise RuntimeError(f"the engine is {self.engine.status}")

    def __del__(self) -> None:
        # Serve calls this after the replica's in-flight requests finished or its
        # graceful_shutdown_timeout_s passed: whatever still runs fails with 503.
        engine = getattr(self, "engine", None)  # absent when the constructor failed
        if engine is not None:
            engine.stop(drain_timeout=0)


def application(replica: ReplicaConfig, scaling: ScalingConfig) -> Application:
    """The Serve application for ``serve.run``: replicas of ``EngineReplica``.

    Raises:
        ModelFolderError: ``replica.model_dir`` is not a model folder here (it must be one
            at the same path on every node).
    """
    # Fail here, with the loader's message, rather than in every replica on every node.
    open_manifest(Path(replica.model_dir), verify=False)
    return EngineReplica.options(**scaling.deployment_options(replica)).bind(replica)


def build_app(args: dict[str, Any]) -> Application:
    """The application builder a Serve config file names in ``import_path``
    (``gpt2onnx.serve.ray.deployment:build_app``); ``args`` are the CLI's flags with
    underscores (see ``config.ARGUMENTS``), e.g. ``{"model_dir": "/models/gpt2"}``."""
    return application(*configs_from_args(args))


def run(app: Application, *, name: str, host: str, port: int, address: str | None) -> str:
    """Join the Ray cluster at ``address`` (None: ``$RAY_ADDRESS``, else start a local
    one), and serve ``app`` at / behind Serve's HTTP proxy on ``host:port``; returns once
    every replica is ready (raises RuntimeError if one fails to start).

    Returns:
        The proxy's URL.
    """
    ray.init(address=address)
    # On a cluster where Serve already runs, its proxy keeps the options it started with.
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/")
    return f"http://{host}:{port}"


def shutdown(name: str) -> None:
    """Delete the application (Serve drains its replicas first) and leave the cluster; a
    local cluster that ``run`` started stops with it."""
    if not ray.is_initialized():
        return
    try:
        serve.delete(name)
    finally:
        ray.shutdown()
