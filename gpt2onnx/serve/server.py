"""uvicorn, with the parts an exposed server needs that uvicorn leaves out.

* **Shutdown in the right order.** uvicorn, on SIGTERM, waits for open responses and then
  cancels them, before the app's shutdown runs: queued requests got a plain-text 500
  and streams were cut. Here the signal first drains the engine (running rows finish
  within the drain time, the rest are answered with a 503 in the OpenAI shape, streams
  with an error event and ``[DONE]``), and only then lets uvicorn close what is left.
* **A model that fails to load ends the process** (exit 1, the reason logged), so a
  supervisor restarts it rather than leaving a server that can never answer.
* **Slow clients cannot hold connections**: headers must arrive within
  ``header_timeout`` seconds of the connection opening (or of the previous response),
  and connections past ``max_connections`` are answered 503 and closed at once, before
  the process runs out of file descriptors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
import threading
from types import FrameType

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gpt2onnx.serve.engine import Engine

log = logging.getLogger("gpt2onnx.serve")

# Descriptors kept for what is not a client connection: the model files, logs, pipes.
_SPARE_FDS = 64


def _error_bytes(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error"
                                 if status >= 500 else "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def guarded_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An h11 protocol class with a header deadline and a connection limit."""
    busy = _error_bytes(503, "Service Unavailable", "too_many_connections",
                        f"the server holds its limit of {max_connections} connections; "
                        "retry in a moment.")
    slow = _error_bytes(408, "Request Timeout", "header_timeout",
                        f"the request headers did not arrive within {header_timeout:g} s.")

    class GuardedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:
                # Nothing of ours is on the wire, so a response of our own can go first.
                self.transport.write(slow)
            self.transport.close()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request on this connection gets the same deadline
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11


def fit_connection_limit(max_connections: int) -> int:
    """Raise the descriptor limit for ``max_connections`` where the hard limit allows;
    otherwise lower the connection limit to fit (with a warning)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + _SPARE_FDS
    if need > soft:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if need > soft:
        fitted = max(1, soft - _SPARE_FDS)
        log.warning("--max-connections %d needs %d file descriptors, the limit is %d: "
                    "serving at most %d connections", max_connections, need, soft, fitted)
        return fitted
    return max_connections


class Server(uvicorn.Server):
    """uvicorn's server, draining the engine before it closes connections and exiting
    when the model cannot load (``failed`` is then set)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.failed: BaseException | None = None
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:  # a second signal: stop now
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("%s: finishing requests for up to %g s, answering the rest with 503",
                 signal.Signals(sig).name, self.drain_timeout)
        threading.Thread(target=self._drain, args=(sig,), name="gpt2onnx-drain",
                         daemon=True).start()

    def _drain(self, sig: int) -> None:
        # Every request has its last output (or its 503) once stop() returns; uvicorn's
        # own graceful wait then only lets those answers reach the clients.
        self.engine.stop(self.drain_timeout)
        super().handle_exit(sig, None)

    async def on_tick(self, counter: int) -> bool:
        error = self.engine.load_error
        if error is not None and self.failed is None:
            self.failed = error
            log.error("exiting: the model could not be loaded: %s", error)
            self.should_exit = True
        return await super().on_tick(counter)
