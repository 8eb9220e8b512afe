"""A submitted request seen from the caller's side: an async or a sync iterator over its
output. Each item holds every choice's progress since the previous item (at most one
``ChoiceDelta`` per choice), so a consumer that falls behind catches up in one read."""

from __future__ import annotations

import asyncio
import queue
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from gpt2onnx.serve.completion import ChoiceDelta, EngineRequest, merge_deltas

if TYPE_CHECKING:
    from gpt2onnx.serve.engine import Ticket

Push = Callable[[Any], None]
Submit = Callable[[EngineRequest, Push], "Ticket"]

DONE = object()  # pushed after a request's last delta; an exception is pushed instead on failure


def _unpack(items: Iterable[Any]) -> tuple[list[ChoiceDelta], bool]:
    """Items pushed by the engine -> (merged deltas, finished). Raises a pushed error."""
    deltas: list[ChoiceDelta] = []
    done = False
    for item in items:
        if item is DONE:
            done = True
        elif isinstance(item, BaseException):
            raise item
        else:
            deltas.extend(item)
    return merge_deltas(deltas), done


class _Stream:
    """What both streams share: an inbox the engine thread pushes into, and the ticket."""

    _inbox: Any  # asyncio.Queue or queue.SimpleQueue: both have empty() and get_nowait()
    _finished: bool
    ticket: Ticket

    def _drain(self, first: Any) -> list[ChoiceDelta]:
        """``first`` and whatever else is already waiting, merged; [] when none of it was
        output (the stream may have finished)."""
        items = [first]
        while not self._inbox.empty():
            items.append(self._inbox.get_nowait())
        try:
            deltas, self._finished = _unpack(items)
        except BaseException:
            self._finished = True
            raise
        return deltas

    def cancel(self) -> None:
        self.ticket.cancel()


class AsyncStream(_Stream):
    """``async for deltas in engine.stream(request)``. Submitting happens at construction,
    so queue-full and validation errors raise before any output. Cancel it (or leave an
    ``async with`` block) to free the request's slots at the next step; a stream dropped
    without either is cancelled when garbage-collected."""

    def __init__(self, submit: Submit, request: EngineRequest) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._inbox = inbox
        self._finished = False

        def push(item: Any) -> None:  # called on the engine thread; must not hold ``self``
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        self.request = request
        self.ticket = submit(request, push)
        weakref.finalize(self, self.ticket.cancel)

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> list[ChoiceDelta]:
        while not self._finished:
            if deltas := self._drain(await self._inbox.get()):
                return deltas
        raise StopAsyncIteration

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


class SyncStream(_Stream):
    """``for deltas in engine.stream_sync(request)``: the blocking twin of ``AsyncStream``."""

    def __init__(self, submit: Submit, request: EngineRequest) -> None:
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._finished = False
        self.request = request
        self.ticket = submit(request, self._inbox.put)
        weakref.finalize(self, self.ticket.cancel)

    def __iter__(self) -> SyncStream:
        return self

    def __next__(self) -> list[ChoiceDelta]:
        while not self._finished:
            if deltas := self._drain(self._inbox.get()):
                return deltas
        raise StopIteration

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()
