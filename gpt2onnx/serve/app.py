"""The HTTP face of an ``Engine``: OpenAI's /v1/completions, /v1/chat/completions and
/v1/models[/{id}], plus /health and /metrics. Nothing here runs the model; handlers only
await the engine's output."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

from gpt2onnx import __version__
from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.model import Model
from gpt2onnx.serve.chat import (
    ChatFormatter,
    ChatTemplate,
    chat_prompt,
    load_template,
    parse_chat,
)
from gpt2onnx.serve.completion import ChoiceDelta, Completion
from gpt2onnx.serve.engine import Engine
from gpt2onnx.serve.errors import (
    BadRequestError,
    BodyTimeoutError,
    ModelNotFoundError,
    PayloadTooLargeError,
    QueueFullError,
    ServeError,
    UnauthorizedError,
)
from gpt2onnx.serve.playground import playground_html
from gpt2onnx.serve.protocol import (
    ON_OVERFLOW,
    CompletionCall,
    CompletionFormatter,
    StreamFormatter,
    error_event,
    http_error,
    parse_completion,
    parse_json_object,
)
from gpt2onnx.serve.security import RequestGuard
from gpt2onnx.serve.streams import AsyncStream

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_BODY_TIMEOUT = 30.0
# Tokenizing a long prompt takes milliseconds: do it off the event loop, which serves
# every other client's stream meanwhile.
_PARSE_OFF_LOOP_BYTES = 16 << 10
T = TypeVar("T")
log = logging.getLogger("gpt2onnx.serve")


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, drain_timeout: float = 30.0,
               manage_engine: bool = True, chat_template: str | None = None,
               on_overflow: str = "error", body_timeout: float = DEFAULT_BODY_TIMEOUT,
               allowed_hosts: Collection[str] = ("*",), any_ip_host: bool = False,
               allowed_origins: Collection[str] = ()) -> FastAPI:
    """A FastAPI app serving ``engine``.

    Args:
        engine: the engine; started (model loaded in the background) and stopped by the
            app's lifespan when ``manage_engine``.
        model_name: the id clients pass as ``model`` and /v1/models lists.
        api_key: when set, /v1/* requires ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies get 413.
        drain_timeout: at shutdown, seconds in-flight requests may take to finish before
            they are cancelled.
        chat_template: /v1/chat/completions' template: a jinja2 file or a built-in name
            ("dialogpt"); default: the folder's tokenizer_config.json ``chat_template``.
        on_overflow: what a request that does not say gets when its prompt and max_tokens
            overflow the context: "error" (a 400) or "truncate" (keep the prompt's end,
            shorten max_tokens).
        body_timeout: seconds a client may take to send a request body (408 after).
        allowed_hosts: host names requests may carry in ``Host`` ("*" in it: any); the
            CLI passes the bound address's (``security.default_allowed_hosts``).
        any_ip_host: accept any IP address literal in ``Host`` too (a wildcard bind).
        allowed_origins: web origins besides the server's own that browsers may call it
            from (CORS); any other ``Origin`` is refused with 403.
    """
    if on_overflow not in ON_OVERFLOW:
        raise InvalidParameterError("on_overflow", f"on_overflow must be one of "
                                    f"{ON_OVERFLOW}, got {on_overflow!r}.")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        yield
        if manage_engine:
            # Off the loop: streams still in flight keep receiving their last tokens.
            await asyncio.to_thread(engine.stop, drain_timeout)

    app = FastAPI(title="gpt2onnx", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    started = int(time.time())
    count = engine.metrics.outcome
    if allowed_origins:
        # Preflights and CORS headers for the origins allowed; RequestGuard (outside it)
        # has refused every other origin already.
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts, any_ip=any_ip_host,
                       allowed_origins=allowed_origins, count=count)

    # Every refusal is counted once: the engine marks what it counted, these handlers
    # count the rest.
    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, exc: ServeError) -> Response:
        if not getattr(exc, "counted", False):
            count(exc.outcome)
        return error_response(exc)

    @app.exception_handler(InvalidParameterError)
    async def on_invalid(request: Request, exc: InvalidParameterError) -> Response:
        if not getattr(exc, "counted", False):
            count("bad_request")
        return error_response(http_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> Response:
        # Unknown paths and methods: the OpenAI shape too, so clients parse one format.
        count("bad_request")
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error",
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        # A bug of ours: logged with its traceback, answered in the OpenAI shape, counted.
        log.error("unhandled error on %s %s", request.method, request.url.path,
                  exc_info=exc)
        count("error")
        body = {"error": {"message": f"internal error ({type(exc).__name__}); the server "
                          "logged it.", "type": "server_error", "param": None,
                          "code": "internal_error"}}
        return JSONResponse(body, status_code=500)

    @app.get("/")
    async def playground() -> Response:
        return HTMLResponse(playground_html(), headers={
            # The page runs only its own inline script and talks only to this server.
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff"})

    @app.get("/health")
    async def health(request: Request) -> Response:
        if engine.ready:
            return JSONResponse({"status": "ok"})
        body: dict[str, Any] = {"status": engine.status}
        if engine.load_error is not None and authorized(request, api_key):
            # The reason names paths on this machine: only for whoever holds the key.
            body["error"] = str(engine.load_error)
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = engine.metrics.render()
        return Response(content, media_type=content_type)

    def card() -> dict[str, Any]:
        out: dict[str, Any] = {"id": model_name, "object": "model", "created": started,
                               "owned_by": "gpt2onnx"}
        if engine.ready:
            out["max_model_len"] = engine.model.context_length
        return out

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request, api_key)
        return JSONResponse({"object": "list", "data": [card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model_card(request: Request, model_id: str) -> Response:
        authorize(request, api_key)
        if model_id != model_name:
            raise ModelNotFoundError(f"model {model_id!r} is not served here; GET /v1/models "
                                     f"lists {model_name!r}.", "model")
        return JSONResponse(card())

    templates: dict[str, ChatTemplate | None] = {}

    def template() -> ChatTemplate | None:
        if "t" not in templates:  # once the model is loaded: it may carry the template
            templates["t"] = load_template(engine.model, chat_template)
        return templates["t"]

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: a prompt (or chat messages, through the template) to ids."""
        authorize(request, api_key)
        data = parse_json_object(await read_body(request, max_body_bytes, body_timeout))
        model = engine.model
        if "messages" in data:
            ids = model.encode(chat_prompt(data.get("messages"), template()))
        else:
            prompt = data.get("prompt")
            if not isinstance(prompt, str):
                raise BadRequestError("prompt must be a string (or send messages).", "prompt",
                                      "invalid_type" if prompt is not None else "missing")
            ids = model.encode(prompt)
        return JSONResponse({"tokens": ids, "count": len(ids),
                             "max_model_len": model.context_length})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        authorize(request, api_key)
        data = parse_json_object(await read_body(request, max_body_bytes, body_timeout))
        model = engine.model
        tokens = data.get("tokens")
        vocab = model.manifest.vocab_size
        if not (isinstance(tokens, list) and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                for t in tokens)):
            raise BadRequestError(f"tokens must be a list of token ids in [0, {vocab - 1}].",
                                  "tokens", "invalid_value")
        return JSONResponse({"prompt": model.tokenizer.decode(tokens,
                                                              skip_special_tokens=False)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        def parse(body: bytes, model: Model) -> tuple[CompletionCall, StreamFormatter]:
            call = parse_completion(body, model, model_name, engine.max_choices,
                                    engine.max_rows, on_overflow)
            return call, CompletionFormatter(call, model.tokenizer)

        return await serve(request, parse)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        def parse(body: bytes, model: Model) -> tuple[CompletionCall, StreamFormatter]:
            chat = parse_chat(body, model, model_name, engine.max_choices, template(),
                              on_overflow)
            return chat.call, ChatFormatter(chat, model.tokenizer)

        return await serve(request, parse)

    Parse = Callable[[bytes, Model], tuple[CompletionCall, StreamFormatter]]

    async def serve(request: Request, parse: Parse) -> Response:
        authorize(request, api_key)
        body = await read_body(request, max_body_bytes, body_timeout)
        model = engine.model
        call, formatter = (await asyncio.to_thread(parse, body, model)
                           if len(body) > _PARSE_OFF_LOOP_BYTES else parse(body, model))
        stream = engine.stream(call.request)  # raises QueueFullError etc. (engine counts)
        streaming = False
        try:
            # The status line waits for the first token: an error before it (timeout,
            # failed run) is still an HTTP error, not a 200 with an error inside.
            first = await unless_disconnected(request, anext(stream))
            if call.stream:
                streaming = True  # from here on, SSEResponse cancels the request
                return SSEResponse(sse_events(call, stream, first, formatter), stream)
            completion = Completion(call.request)
            completion.add(first)
            await unless_disconnected(request, collect(stream, completion))
            return JSONResponse(formatter.response(completion))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            if not streaming:
                stream.cancel()  # frees the slots of an abandoned request; no-op if finished

    return app


def error_response(exc: ServeError) -> JSONResponse:
    headers = {}
    if isinstance(exc, QueueFullError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


def authorized(request: Request, api_key: str | None) -> bool:
    try:
        authorize(request, api_key)
    except UnauthorizedError:
        return False
    return True


def authorize(request: Request, api_key: str | None) -> None:
    """Bearer-token check. Digests are compared, in constant time, so neither the key's
    content nor its length leaks through timing."""
    if api_key is None:
        return
    header = request.headers.get("authorization")
    if not header:
        raise UnauthorizedError("missing API key: send the header 'Authorization: Bearer KEY'.")
    scheme, _, token = header.partition(" ")
    given = hashlib.sha256(token.strip().encode()).digest()
    if not (hmac.compare_digest(given, hashlib.sha256(api_key.encode()).digest())
            and scheme.lower() == "bearer"):
        raise UnauthorizedError("invalid API key.")


async def read_body(request: Request, limit: int,
                    timeout: float = DEFAULT_BODY_TIMEOUT) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes, and
    with 408 when it takes over ``timeout`` seconds to arrive (a slow client holds a
    connection and a task for as long as it sends)."""
    too_large = PayloadTooLargeError(f"the request body is over the limit of {limit} bytes; "
                                     "send a shorter prompt.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []

    async def receive() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), timeout)
    except TimeoutError as exc:
        raise BodyTimeoutError(f"the request body did not arrive within {timeout:g} s; "
                               "send it at once.") from exc
    return b"".join(chunks)


class ClientGone(Exception):
    """The client disconnected while its request waited for output."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first (then ``ClientGone``)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():  # finished first (or together with the disconnect): its result counts
        return task.result()
    task.cancel()  # requested only: the task is not cancelled yet, so never read its result
    raise ClientGone


async def _disconnect(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(stream: AsyncStream, completion: Completion) -> None:
    async for deltas in stream:
        completion.add(deltas)


async def sse_events(call: CompletionCall, stream: AsyncStream, first: list[ChoiceDelta],
                     formatter: StreamFormatter) -> AsyncIterator[str]:
    try:
        yield formatter.chunks(first)
        async for deltas in stream:
            yield formatter.chunks(deltas)
        if call.include_usage:
            yield formatter.usage_chunk()
    except ServeError as exc:
        yield error_event(exc)
    yield "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A server-sent-event stream that cancels its request however the response ends:
    finished, failed, or cut off by the client disconnecting."""

    def __init__(self, content: AsyncIterator[str], stream: AsyncStream) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.cancel()
