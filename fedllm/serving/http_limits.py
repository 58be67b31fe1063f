"""HTTP hardening shared by the router and the hospital nodes: limits, a guarded uvicorn
protocol and a body-guarding ASGI middleware.

uvicorn on its own reads headers of any size, waits forever for headers or a body that never
comes, accepts any number of connections and answers malformed HTTP with ``text/plain``. One
client could therefore hold every connection and worker open (slowloris) or make a server buffer
megabytes of headers. This module closes those gaps in two places:

- :class:`GuardedHttpToolsProtocol` (the connection level, before the app sees anything): at
  most ``max_incoming_connections`` open connections (503), request line + headers at most
  ``max_header_bytes`` (431) and complete within ``header_timeout_s`` (408), and JSON instead of
  uvicorn's plain-text 400 for malformed HTTP.
- :class:`BodyGuardMiddleware` (the ASGI level, where the body is read): bodies larger than
  ``max_request_bytes`` (413), bodies not complete within ``body_timeout_s`` of the headers
  (408), and a client that disconnects mid-body (400, nobody is left to read it) all become the
  app's own JSON errors instead of tracebacks and 500s. uvicorn has no body read timeout.

Each app says how its errors look (``render``), so a node's errors keep the node's shape and the
router's keep the router's. `uvicorn_options` turns an app's limits into uvicorn keyword
arguments; every way of serving an app (``fedllm serve``, ``fedllm router``,
``BackgroundServer``) goes through it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog
from pydantic import Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from fedllm.config.schema import StrictModel

log = structlog.get_logger(__name__)

ErrorRenderer = Callable[[int, str], dict[str, Any]]
CLOSE = {"Connection": "close"}


class ServerLimits(StrictModel):
    """Limits of one HTTP server (a node's or the router's ``limits:`` section).

    The defaults suit a hospital network: real clients send a few KiB of headers at once and
    their bodies within seconds, while a slow or hostile client is cut off quickly.
    """

    max_request_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    header_timeout_s: float = Field(10.0, gt=0, le=3600, allow_inf_nan=False)
    body_timeout_s: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)
    keepalive_timeout_s: int = Field(5, ge=1, le=3600)
    max_incoming_connections: int = Field(512, ge=1, le=100_000)


def detail_body(status_code: int, detail: str) -> dict[str, Any]:
    """The plainest JSON error, ``{"detail": ...}``, for apps that do not say otherwise."""
    del status_code
    return {"detail": detail}


@dataclass(frozen=True)
class HttpGuard:
    """An app's limits and how its error bodies look (kept on ``app.state.http_guard``)."""

    limits: ServerLimits
    render: ErrorRenderer = detail_body


def install_http_guard(app: Any, limits: ServerLimits, render: ErrorRenderer = detail_body) -> None:
    """Add the body guard to ``app`` and remember its limits for `uvicorn_options`."""
    guard = HttpGuard(limits, render)
    app.state.http_guard = guard
    app.add_middleware(BodyGuardMiddleware, guard=guard)


def app_guard(app: Any) -> HttpGuard:
    """The guard `install_http_guard` left on ``app``, or the default limits for other apps."""
    state = getattr(app, "state", None)
    guard = getattr(state, "http_guard", None)
    return guard if isinstance(guard, HttpGuard) else HttpGuard(ServerLimits())


def uvicorn_options(app: Any) -> dict[str, Any]:
    """uvicorn keyword arguments that enforce ``app``'s limits (protocol, keep-alive)."""
    guard = app_guard(app)
    protocol = type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"guard": guard})
    return {
        "http": protocol,
        "timeout_keep_alive": guard.limits.keepalive_timeout_s,
        "h11_max_incomplete_event_size": guard.limits.max_header_bytes,
    }


def json_response_bytes(guard: HttpGuard, status_code: int, message: str) -> bytes:
    """A complete HTTP/1.1 JSON error response that closes the connection."""
    body = json.dumps(guard.render(status_code, message)).encode()
    return b"".join(
        [
            STATUS_LINE[status_code],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class _HeadersTooLargeError(Exception):
    """Raised from a parser callback to stop parsing; the refusal is sent by the protocol."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with connection, header-size and header-time limits."""

    guard: ClassVar[HttpGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_headers = True
        self._raw_header_bytes = 0
        self._parsed_header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.guard.limits.max_incoming_connections
        if len(self.connections) > limit:
            log.warning("http_connection_refused", reason="too many connections", limit=limit)
            self._refuse(503, f"too many open connections (limit {limit}); try again later")
            return
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_headers:
            self._raw_header_bytes += len(data)
        super().data_received(data)
        limit = self.guard.limits.max_header_bytes
        if (
            self._reading_headers
            and self._raw_header_bytes > limit
            and not self.transport.is_closing()
        ):
            self._refuse(431, f"request line and headers exceed {limit} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._reading_headers:  # a keep-alive connection's next request
            self._reading_headers = True
            self._raw_header_bytes = 0
        self._parsed_header_bytes = 0
        if self._header_timer is None:  # the connection's first deadline still holds
            self._start_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (or a refusal raised while parsing): a JSON error, then close."""
        status, message = self._refusal or (400, f"malformed HTTP request: {msg}")
        self._refuse(status, message)

    def _count_header_bytes(self, count: int) -> None:
        self._parsed_header_bytes += count
        limit = self.guard.limits.max_header_bytes
        if self._parsed_header_bytes > limit:
            self._refusal = (431, f"request line and headers exceed {limit} bytes")
            raise _HeadersTooLargeError

    def _start_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(
            self.guard.limits.header_timeout_s, self._header_timeout
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._reading_headers and not self.transport.is_closing():
            timeout = self.guard.limits.header_timeout_s
            log.warning("http_header_timeout", timeout_s=timeout)
            self._refuse(408, f"request headers not received within {timeout:g} s")

    def _refuse(self, status_code: int, message: str) -> None:
        """Answer with a JSON error and close, unless the connection is already going away."""
        self._cancel_header_timer()
        self._reading_headers = False
        if self.transport.is_closing():
            return
        self.transport.write(json_response_bytes(self.guard, status_code, message))
        self.transport.close()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyGuardMiddleware:
    """Bound the request body's size and the time it may take; handle clients leaving mid-body.

    Errors are raised from ``receive`` as Starlette ``HTTPException`` so the app's own exception
    handlers render them in its error shape; every one closes the connection, since the rest of
    the body is never read. Once the whole body has arrived, ``receive`` is passed through
    untouched (an app may legitimately wait for the disconnect).
    """

    def __init__(self, app: ASGIApp, *, guard: HttpGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.guard.limits
        declared = _content_length(scope)
        if declared is not None and declared > limits.max_request_bytes:
            await self._send_error(send, 413, self._too_large())
            return
        deadline = asyncio.get_running_loop().time() + limits.body_timeout_s
        received = 0
        complete = False

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                complete = True
                log.warning("http_body_timeout", timeout_s=limits.body_timeout_s)
                raise HTTPException(
                    408, f"request body not received within {limits.body_timeout_s:g} s", CLOSE
                ) from None
            if message["type"] == "http.disconnect":
                complete = True
                log.info("http_client_disconnected_mid_body")
                raise HTTPException(400, "client disconnected before sending the whole body", CLOSE)
            received += len(message.get("body", b""))
            if received > limits.max_request_bytes:
                complete = True
                raise HTTPException(413, self._too_large(), CLOSE)
            complete = not message.get("more_body", False)
            return message

        await self.app(scope, guarded_receive, send)

    def _too_large(self) -> str:
        return f"request body larger than {self.guard.limits.max_request_bytes} bytes"

    async def _send_error(self, send: Send, status_code: int, message: str) -> None:
        body = json.dumps(self.guard.render(status_code, message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
