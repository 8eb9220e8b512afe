"""python -m gpt2onnx.serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [options]"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from gpt2onnx.cli import Parser, parsed_as, run_main, utf8_text
from gpt2onnx.contract import LAYOUT_FUSED, Manifest
from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.kvmem import human, kv_cache_bytes
from gpt2onnx.runtime.folder import open_manifest
from gpt2onnx.runtime.generate import add_session_args
from gpt2onnx.runtime.model import Model
from gpt2onnx.runtime.params import MAX_DRAFT_TOKENS
from gpt2onnx.serve.app import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES, create_app
from gpt2onnx.serve.chat import BUILT_IN, check_template_file
from gpt2onnx.serve.engine import Engine, EngineConfig, server_spinning
from gpt2onnx.serve.security import default_allowed_hosts
from gpt2onnx.serve.server import Server, fit_connection_limit, guarded_protocol

API_KEY_ENV = "GPT2ONNX_API_KEY"
# Seconds uvicorn waits, once the engine has drained, for the last answers to be written.
_FLUSH_S = 5.0

# The numeric flags' ranges: (flag's dest, low, high). check_server_args refuses a value
# above the range; below it, the engine's own check (EngineConfig) answers, or
# check_server_args for the HTTP side's flags. Text that is no number is refused by argparse,
# naming the range.
MAX_BATCH_SIZE = 1024  # cache slots; each holds a whole context (kvmem: 75 MB for gpt2 fp32)
MAX_SECONDS = 86_400.0  # a day: any timeout longer than that is a mistake
INT_RANGES: dict[str, tuple[int, int]] = {
    "port": (0, 65535),
    "max_batch_size": (1, MAX_BATCH_SIZE),
    "max_queue": (0, 1 << 20),
    "max_queued_tokens": (1, 1 << 30),
    "prefill_chunk": (1, 1 << 20),
    "max_step_tokens": (1, 1 << 20),
    "prefix_cache_mb": (0, 1 << 20),  # 1 TiB of host memory
    "prefix_block_tokens": (1, 1 << 16),
    "max_n": (1, 128),  # OpenAI's own limit on n
    "max_body_bytes": (1, 1 << 30),
    "max_connections": (1, 1 << 20),
    "num_draft_tokens": (1, MAX_DRAFT_TOKENS),
    "speculative_max_batch": (0, MAX_BATCH_SIZE),
}
SECONDS_FLAGS = ("timeout", "shutdown_timeout", "header_timeout", "body_timeout")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _int_flag(dest: str) -> Callable[[str], Any]:
    low, high = INT_RANGES[dest]
    return parsed_as(int, f"an integer in [{low}, {high}]")


_SECONDS = parsed_as(float, f"a number of seconds in (0, {MAX_SECONDS:g}]")
_SECONDS_OR_0 = parsed_as(float, f"a number of seconds in [0, {MAX_SECONDS:g}]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Most ranges are checked by check_server_args and EngineConfig, as typed errors (one
    # "error:" line and exit 2 from main, the same messages as the Python API).
    d = EngineConfig()
    p = Parser(
        prog="python -m gpt2onnx.serve",
        description="Serve a model folder with an OpenAI-compatible API (/v1/completions).")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=_int_flag("port"), default=8000)
    add_session_args(p, spin_default="spin, unless GPT2ONNX_SPIN=0; with a draft model, "
                     "spin within runs only")
    p.add_argument("--max-batch-size", type=_int_flag("max_batch_size"), default=d.max_batch_size,
                   help="cache slots: rows decoded together")
    p.add_argument("--max-queue", type=_int_flag("max_queue"), default=d.max_queue,
                   help="rows (prompts x n) that may wait while every slot is busy; more get "
                        "429 (a request may have up to max-queue + max-batch-size rows)")
    p.add_argument("--max-queued-tokens", type=_int_flag("max_queued_tokens"),
                   default=d.max_queued_tokens,
                   help="prompt tokens that may wait; more get 429")
    p.add_argument("--timeout", type=_SECONDS, default=d.request_timeout,
                   help="seconds a request may take, queueing included (504 after)")
    p.add_argument("--prefill-chunk", type=_int_flag("prefill_chunk"), default=d.prefill_chunk,
                   help="prompt tokens run per step while rows decode (chunked prefill): "
                        "a running stream waits at most this much prefill between tokens")
    p.add_argument("--max-stall", type=parsed_as(float, "a ratio above 1"), default=d.max_stall,
                   help="a step with prompt chunks takes at most this many plain decode steps "
                        "(measured; the chunk shrinks below --prefill-chunk to keep it): "
                        "smoother streams, slower prefill; default off (always "
                        "--prefill-chunk)")
    p.add_argument("--no-mixed-runs", action="store_true",
                   help="run prompt chunks and decode tokens as separate model runs even when "
                        "the folder has a mixed graph (model_mixed.onnx)")
    p.add_argument("--max-step-tokens", type=_int_flag("max_step_tokens"),
                   default=d.max_step_tokens,
                   help="prompt tokens run per step while no row decodes, by the oldest request's "
                        "prompts (a later request's get what they leave of one "
                        "--prefill-chunk, unless the oldest only scores)")
    p.add_argument("--prefix-cache-mb", type=_int_flag("prefix_cache_mb"),
                   default=d.prefix_cache_mb,
                   help="host memory for reusable prompt blocks (prefix caching; 0 = off)")
    p.add_argument("--prefix-block-tokens", type=_int_flag("prefix_block_tokens"),
                   default=d.prefix_block_tokens,
                   help="prefixes are matched in whole blocks of this many tokens")
    p.add_argument("--max-n", type=_int_flag("max_n"), default=d.max_choices,
                   help="choices per prompt (OpenAI's n)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), type=utf8_text,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, type=utf8_text,
                   help="the model id clients send (default: the folder's name)")
    p.add_argument("--max-body-bytes", type=_int_flag("max_body_bytes"),
                   default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--shutdown-timeout", type=_SECONDS_OR_0, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM; the rest are "
                        "answered with 503")
    p.add_argument("--header-timeout", type=_SECONDS, default=10.0,
                   help="seconds a client has to send a request's headers")
    p.add_argument("--body-timeout", type=_SECONDS, default=DEFAULT_BODY_TIMEOUT,
                   help="seconds a client has to send a request's body")
    p.add_argument("--max-connections", type=_int_flag("max_connections"), default=512,
                   help="open connections; more are answered 503 and closed")
    p.add_argument("--allowed-hosts", default=None, metavar="NAME[,NAME...]|*",
                   help="Host header names accepted besides the bound address and loopback "
                        "(default: those only; a 0.0.0.0 bind takes IP addresses and this "
                        "machine's names): guards against DNS rebinding")
    p.add_argument("--allowed-origins", default=None, metavar="ORIGIN[,ORIGIN...]|*",
                   help="web origins (https://app.example) whose pages may call this server "
                        "(CORS); pages elsewhere are refused with 403")
    p.add_argument("--speculative", default=None, metavar="ngram|draft:FOLDER", type=utf8_text,
                   help="speculative decoding: prompt lookup, or a draft model folder with "
                        "this model's tokenizer (a smaller GPT-2, or an int8/int4 export of "
                        "the same checkpoint); greedy output is unchanged")
    p.add_argument("--num-draft-tokens", type=_int_flag("num_draft_tokens"),
                   default=d.num_draft_tokens,
                   help="draft tokens checked per row and step at most (adapts downwards)")
    p.add_argument("--speculative-max-batch", type=_int_flag("speculative_max_batch"),
                   default=d.speculative_max_batch,
                   help="speculate only while at most this many rows run (on the CPU each "
                        "speculating row verifies in a run of its own)")
    p.add_argument("--chat-template", default=None, metavar="FILE|dialogpt", type=utf8_text,
                   help="/v1/chat/completions' jinja2 template (default: the folder's "
                        "tokenizer_config.json chat_template; 'dialogpt': turns joined by EOS)")
    p.add_argument("--on-overflow", default="error", choices=("error", "truncate"),
                   help="for requests that do not say: a prompt + max_tokens over the context "
                        "is a 400 (error) or keeps the prompt's end and shortens max_tokens "
                        "(truncate)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    return p.parse_args(argv)


def check_server_args(args: argparse.Namespace) -> None:
    """The HTTP side's settings, before anything starts (the engine checks its own, but
    their upper bounds are checked here)."""
    for dest, (_, high) in INT_RANGES.items():
        value = getattr(args, dest)
        if value > high:
            low = INT_RANGES[dest][0]
            raise InvalidParameterError(dest, f"{_flag(dest)} must be in [{low}, {high}], got "
                                        f"{value}; pass a smaller value.")
    for dest in SECONDS_FLAGS:
        if (getattr(args, dest) or 0) > MAX_SECONDS:
            raise InvalidParameterError(dest, f"{_flag(dest)} must be at most {MAX_SECONDS:g} "
                                        f"seconds (a day), got {getattr(args, dest)}; pass a "
                                        "smaller number of seconds.")
    if not 0 <= args.port <= 65535:
        raise InvalidParameterError("port", f"--port must be in [0, 65535], got {args.port}.")
    if args.max_body_bytes < 1:
        raise InvalidParameterError("max_body_bytes", "--max-body-bytes must be >= 1, got "
                                    f"{args.max_body_bytes}.")
    t = args.shutdown_timeout
    if not (math.isfinite(t) and t >= 0):
        raise InvalidParameterError("shutdown_timeout", "--shutdown-timeout must be a "
                                    f"number of seconds >= 0, got {t}.")
    for name in ("header_timeout", "body_timeout"):
        t = getattr(args, name)
        if not (math.isfinite(t) and t > 0):
            flag = "--" + name.replace("_", "-")
            raise InvalidParameterError(name, f"{flag} must be a number of seconds > 0, "
                                        f"got {t}.")
    if args.max_connections < 1:
        raise InvalidParameterError("max_connections", "--max-connections must be >= 1, "
                                    f"got {args.max_connections}.")
    for name in ("allowed_hosts", "allowed_origins"):
        value = getattr(args, name)
        if value is not None and not _split_list(value):
            flag = "--" + name.replace("_", "-")
            raise InvalidParameterError(name, f"{flag} needs at least one name (or '*'), "
                                        f"got {value!r}.")
    for origin in _split_list(args.allowed_origins or ""):
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise InvalidParameterError(
                "allowed_origins", f"--allowed-origins takes origins, a scheme and a host "
                f"like https://app.example:8443; got {origin!r}.")
    key = args.api_key
    if key is not None and not (key and key.isascii() and key.isprintable()
                                and key == key.strip()):
        raise InvalidParameterError(
            "api_key", f"the API key (--api-key or ${API_KEY_ENV}) must be non-empty printable "
            "ASCII with no surrounding spaces (clients send it in an HTTP header); unset "
            f"{API_KEY_ENV} to serve without a key.")


_CACHE_DTYPE_BYTES = {"float32": 4, "float16": 2}


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_cache_fits(manifest: Manifest, max_batch_size: int, provider: str) -> None:
    """Refuse a --max-batch-size whose KV cache (max_batch_size slots, each a whole context:
    ``gpt2onnx.kvmem``) cannot fit in this machine's memory, before the engine allocates it
    (which would fail with a MemoryError after the server said it was running). On CUDA the
    cache lives in the GPU's memory, which this does not know: onnxruntime reports that."""
    memory = physical_memory()
    if provider != "cpu" or not memory:
        return
    m = manifest
    seq = m.max_length if m.layout == LAYOUT_FUSED and m.max_length else m.context_length
    per_row = kv_cache_bytes(m.n_layer, m.n_head, m.head_dim, 1, seq,
                             _CACHE_DTYPE_BYTES.get(m.cache_dtype, 4))
    need = per_row * max_batch_size
    if need <= memory:
        return
    fits = memory // per_row
    fix = (f"pass --max-batch-size {fits} or less" if fits >= 1
           else "one row does not fit either")
    raise InvalidParameterError(
        "max_batch_size", f"--max-batch-size {max_batch_size} needs a KV cache of "
        f"{human(need)} ({max_batch_size} rows x {human(per_row)}, {seq} tokens each), more "
        f"than this machine's {human(memory)} of memory; {fix}, or export the model with a "
        "smaller --max-length (python -m gpt2onnx.export ... --max-length N).")


def check_bind(host: str, port: int) -> None:
    """Bind a socket to (host, port) as uvicorn will (asyncio's create_server: every address
    the host resolves to, SO_REUSEADDR, IPv6 sockets v6-only) and close it again, so that a
    host that does not resolve or is not this machine's, or a port in use, is one "error:"
    line before the model loads rather than uvicorn's log lines after."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    fix = ("pass another --host (an address of this machine, e.g. 127.0.0.1 or 0.0.0.0) "
           "or --port (0: any free port)")
    try:
        infos = socket.getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InvalidParameterError(
            "host", f"cannot listen on {where} (the host does not resolve: {reason}); "
            f"{fix}.") from None
    v6 = getattr(socket, "AF_INET6", None) if hasattr(socket, "IPPROTO_IPV6") else None
    for family, kind, proto, address in dict.fromkeys((f, k, p, a) for f, k, p, _, a in infos):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks (IPv6): asyncio skips it too
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise InvalidParameterError(
                "port", f"cannot listen on {where} ({reason}); {fix}.") from None
        finally:
            sock.close()


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def allowed_hosts(args: argparse.Namespace) -> tuple[list[str], bool]:
    """(Host names, any IP literal too) the server answers to (``security.RequestGuard``)."""
    own, any_ip = default_allowed_hosts(args.host)
    return sorted(own | {h.lower() for h in _split_list(args.allowed_hosts or "")}), any_ip


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    # The engine thread gets the GIL back after every model run (onnxruntime releases it);
    # the default 5 ms switch interval can make it wait that long behind the event loop,
    # as long as a whole decode step of a small model.
    sys.setswitchinterval(0.001)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_server_args(args)
    manifest = open_manifest(args.model_dir, verify=False)  # fail now, not after binding
    config = EngineConfig(max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                          max_queued_tokens=args.max_queued_tokens,
                          request_timeout=args.timeout, max_choices=args.max_n,
                          prefill_chunk=args.prefill_chunk,
                          max_stall=args.max_stall,
                          max_step_tokens=args.max_step_tokens,
                          prefix_cache_mb=args.prefix_cache_mb,
                          prefix_block_tokens=args.prefix_block_tokens,
                          speculative=args.speculative,
                          num_draft_tokens=args.num_draft_tokens,
                          speculative_max_batch=args.speculative_max_batch,
                          mixed_runs=not args.no_mixed_runs)
    if args.speculative and args.speculative.startswith("draft:"):
        open_manifest(Path(args.speculative[len("draft:"):]), verify=False)
    if args.chat_template and args.chat_template not in BUILT_IN:
        check_template_file(args.chat_template)
    check_cache_fits(manifest, args.max_batch_size, args.provider)
    spinning = server_spinning(args.spinning, args.speculative)  # reads GPT2ONNX_SPIN
    check_bind(args.host, args.port)  # last: the others cost nothing to fix first
    mixed = config.mixed_runs  # ``config`` is rebound to uvicorn's below
    engine = Engine(lambda: Model(args.model_dir, provider=args.provider,
                                  threads=args.threads, spinning=spinning,
                                  mixed=mixed), config)
    name = args.served_model_name or args.model_dir.resolve().name
    hosts, any_ip = allowed_hosts(args)
    app = create_app(engine, model_name=name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes, drain_timeout=args.shutdown_timeout,
                     chat_template=args.chat_template, on_overflow=args.on_overflow,
                     body_timeout=args.body_timeout, allowed_hosts=hosts, any_ip_host=any_ip,
                     allowed_origins=_split_list(args.allowed_origins or ""))
    protocol = guarded_protocol(args.header_timeout,
                                fit_connection_limit(args.max_connections))
    # On SIGTERM the Server drains the engine first (see server.py); uvicorn's graceful
    # wait after that only lets the last answers reach their clients.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            http=protocol, timeout_graceful_shutdown=_FLUSH_S,
                            server_header=False)
    server = Server(config, engine, args.shutdown_timeout)
    try:
        server.run()
    except KeyboardInterrupt:  # Terminated too
        # uvicorn re-raises the SIGINT/SIGTERM it handled once its graceful shutdown is
        # done (so that the previous handler sees it): that shutdown was asked for, not
        # an interrupted one.
        if not server.should_exit:
            raise
    if server.failed is not None:
        print(f"error: the model folder could not be loaded: {server.failed}", file=sys.stderr)
        return 1
    if not server.started:
        return 1  # uvicorn could not bind the port (it logged why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
