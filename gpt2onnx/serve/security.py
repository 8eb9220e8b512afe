"""What a browser may make a local server do: nothing, unless the server says so.

A web page can POST to ``http://127.0.0.1:8000`` from any site (a "simple" request:
``text/plain`` or form bodies need no CORS preflight), and with DNS rebinding it can
even read the answer, because the browser then believes the server is the page's own
host. Three checks close that, before any handler runs:

* ``Host`` must name this server (its address, a loopback name, or ``--allowed-hosts``):
  a rebinding attack arrives with the attacker's domain in ``Host``.
* ``Origin``, which browsers send on cross-site requests, must be the server's own (the
  playground) or one of ``--allowed-origins``, which also get CORS headers and preflight
  answers. Clients that are not browsers send no ``Origin`` and are not affected.
* POST bodies must be ``application/json``, which a page cannot send cross-site without a
  preflight that the server refuses.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def default_allowed_hosts(bind: str) -> tuple[frozenset[str], bool]:
    """(host names, whether any IP address literal is accepted) for a server bound to
    ``bind``. A wildcard bind does not know the addresses clients use, so it accepts IP
    literals and this machine's names; a rebinding attack needs a domain name."""
    if bind.strip("[]") in WILDCARDS:
        return LOOPBACK_NAMES | _machine_names(), True
    return LOOPBACK_NAMES | {bind.lower().strip("[]")}, False


def _machine_names() -> frozenset[str]:
    names = set()
    try:
        names.add(socket.gethostname().lower())
        names.add(socket.getfqdn().lower())
    except OSError:  # no resolver: the IP literals and loopback names still work
        pass
    return frozenset(names)


def _split_host(value: str) -> str:
    """'Host' header value -> the host part, lowercase, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    host, sep, port = value.rpartition(":")
    return host if sep and port.isdigit() else value


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class RequestGuard:
    """ASGI middleware: Host, Origin and Content-Type checks (see the module docstring).
    Refusals are JSON in the OpenAI error shape; ``count`` is told each one."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: Collection[str],
                 any_ip: bool = False, allowed_origins: Collection[str] = (),
                 count: Callable[[str], None] = lambda outcome: None) -> None:
        """
        Args:
            allowed_hosts: host names (no ports) requests may name; "*" in it for any.
            any_ip: accept any IP address literal as the host too (a wildcard bind).
            allowed_origins: origins ("https://app.example:8443") besides the server's own
                that may call it from a browser; "*" in it allows every origin.
        """
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = frozenset(h.lower().strip("[]") for h in allowed_hosts)
        self.any_ip = any_ip
        self.any_origin = "*" in allowed_origins
        self.origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        self.count = count

    def host_allowed(self, host: str) -> bool:
        return self.any_host or host in self.hosts or (self.any_ip and _is_ip(host))

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        origin = origin.rstrip("/").lower()
        if self.any_origin or origin in self.origins:
            return True
        # Same origin: the page was served by this server under the name it uses now.
        scheme, sep, rest = origin.partition("://")
        return bool(sep) and scheme in ("http", "https") and rest == host_header.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host_header = headers.get("host", "")
        host = _split_host(host_header)
        if not self.host_allowed(host):
            await self._refuse(send, 421, "misdirected_request", "host", (
                f"this server does not answer to the host {host!r}; start it with "
                f"--allowed-hosts {host or 'NAME'} to allow that name."))
            return
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host_header):
            await self._refuse(send, 403, "origin_not_allowed", "origin", (
                f"requests from the web origin {origin!r} are not allowed; start the server "
                f"with --allowed-origins {origin} to let pages there call it."))
            return
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                await self._refuse(send, 415, "unsupported_media_type", "content-type", (
                    f"request bodies must be JSON, sent with 'Content-Type: application/json' "
                    f"(got {kind or 'no Content-Type'!r}); with curl, add "
                    "-H 'Content-Type: application/json'."))
                return
        await self.app(scope, receive, send)

    async def _refuse(self, send: Send, status: int, code: str, param: str,
                      message: str) -> None:
        self.count("bad_request")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "param": param, "code": code}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
