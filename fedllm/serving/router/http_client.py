"""A small keep-alive HTTP/1.1 client for router → node calls.

Profiling the router showed httpx/httpcore spending about 1.2 ms of CPU per forwarded request
(connection-pool bookkeeping scans every connection on every request), i.e. most of the
router's CPU. The router only ever sends small JSON requests to a handful of known nodes, so
this client does just that: one idle-connection stack per node, request bytes written in
one go, the response parsed by httptools (the C parser uvicorn uses), TLS and mutual TLS via
``asyncio.open_connection(ssl=...)``. Anything unexpected closes the connection. Each request
carries the current span's W3C ``traceparent``, so the node continues the router's trace (none
when tracing is off).

A kept-alive connection can be closed by the node just as a request goes out on it. Only
idempotent requests (GET, HEAD) are then sent again, once, on a fresh connection: a POST may
already have been acted on (a consensus session opened, ε charged), so it fails with
NodeTransportError and the caller decides (the node pool books the failure and fails over).
To keep that rare, a connection idle for more than ``MAX_IDLE_REUSE_S`` is not reused.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

from fedllm.telemetry.tracing import trace_headers

# Node answers are small JSON documents; anything bigger is a broken or hostile node.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
READ_CHUNK = 65536
# Well under the 5 s keep-alive timeout of uvicorn (and of fedllm nodes by default), so a node
# is rarely closing a connection the router picks for reuse.
MAX_IDLE_REUSE_S = 2.0
# Requests that may be sent twice without changing anything more than sending them once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD"})


class NodeTransportError(Exception):
    """The request may not have reached the node, or its answer was lost or malformed."""


class NodeConnectError(NodeTransportError):
    """No connection could be made (refused, unreachable, TLS handshake failed)."""


class NodeTimeoutError(NodeTransportError):
    """The node did not answer in time."""


@dataclass(frozen=True)
class NodeResponse:
    """Status and body of a node's answer."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        """The body parsed as JSON (ValueError if it is not)."""
        return json.loads(self.content)


class _Origin:
    """Scheme, host and port of a node URL, and its idle connections."""

    def __init__(self, base_url: str, max_connections: int) -> None:
        parts = urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.host_header = f"{self.host}:{self.port}".encode()
        # (reader, writer, time.monotonic() when it went idle), most recent last
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.slots = asyncio.Semaphore(max_connections)


class _Parser:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        # httptools answers should_keep_alive() correctly only until the message completes.
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_RESPONSE_BYTES:
            raise NodeTransportError("response too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class NodeClient:
    """Pooled HTTP/1.1 keep-alive connections to a set of node base URLs."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        timeout_s: float,
        connect_timeout_s: float,
        max_connections: int,
        max_idle_connections: int,
    ) -> None:
        self._ssl = ssl_context
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._max_idle = max_idle_connections
        self._origins: dict[str, _Origin] = {}

    def _origin(self, base_url: str) -> _Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = _Origin(base_url, self._max_connections)
            self._origins[base_url] = origin
        return origin

    async def request(
        self,
        method: str,
        base_url: str,
        path: str,
        payload: Any = None,
        *,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> NodeResponse:
        """Send one request; NodeTransportError (or a subclass) if no valid answer came back."""
        origin = self._origin(base_url)
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        # the W3C traceparent of the current span, so the node continues the router's trace
        sent = {**trace_headers(), **headers} if headers else trace_headers()
        if any("\r" in part or "\n" in part for item in sent.items() for part in item):
            raise ValueError("header names and values must not contain line breaks")
        extra = "".join(f"{name}: {value}\r\n" for name, value in sent.items())
        head = (
            f"{method} {origin.prefix}{path} HTTP/1.1\r\n".encode()
            + b"Host: "
            + origin.host_header
            + b"\r\nAccept: application/json\r\nContent-Type: application/json\r\n"
            + f"{extra}Content-Length: {len(body)}\r\n\r\n".encode()
        )
        async with origin.slots:
            try:
                async with asyncio.timeout(timeout_s or self._timeout_s):
                    return await self._exchange(
                        origin, head + body, resend=method in IDEMPOTENT_METHODS
                    )
            except TimeoutError:
                raise NodeTimeoutError("timed out") from None

    async def _exchange(self, origin: _Origin, request: bytes, *, resend: bool) -> NodeResponse:
        """One exchange on an idle connection if there is a live one, else on a new one; when a
        reused connection closes before any answer, ``resend`` allows one fresh try."""
        while origin.idle:
            reader, writer, idle_since = origin.idle.pop()
            if (
                writer.is_closing()
                or reader.at_eof()
                or time.monotonic() - idle_since > MAX_IDLE_REUSE_S
            ):
                writer.close()
                continue
            response = await self._round_trip(origin, reader, writer, request, reused=True)
            if response is not None:
                return response
            if not resend:
                raise NodeTransportError("kept-alive connection closed before any response")
            break
        reader, writer = await self._connect(origin)
        response = await self._round_trip(origin, reader, writer, request, reused=False)
        if response is None:
            raise NodeTransportError("connection closed before any response")
        return response

    async def _connect(self, origin: _Origin) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = (self._ssl or ssl.create_default_context()) if origin.tls else None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                return await asyncio.open_connection(
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context else None,
                    limit=READ_CHUNK,
                )
        except TimeoutError:
            raise NodeConnectError("connect timed out") from None
        except (OSError, ssl.SSLError) as error:
            raise NodeConnectError(f"connect failed: {type(error).__name__}") from None

    async def _round_trip(
        self,
        origin: _Origin,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: bytes,
        *,
        reused: bool,
    ) -> NodeResponse | None:
        """One request/response; None when a reused connection turned out to be closed."""
        collector = _Parser()
        parser = httptools.HttpResponseParser(collector)
        collector.parser = parser
        received = False
        try:
            writer.write(request)
            await writer.drain()
            while not collector.complete:
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    if reused and not received:
                        writer.close()
                        return None
                    raise NodeTransportError("connection closed mid-response")
                received = True
                parser.feed_data(chunk)
        except (OSError, ssl.SSLError, httptools.HttpParserError) as error:
            writer.close()
            if reused and not received:
                return None
            raise NodeTransportError(f"transport: {type(error).__name__}") from None
        except BaseException:
            writer.close()
            raise
        if collector.keep_alive and len(origin.idle) < self._max_idle:
            origin.idle.append((reader, writer, time.monotonic()))
        else:
            writer.close()
        return NodeResponse(parser.get_status_code(), b"".join(collector.body))

    async def aclose(self) -> None:
        """Close every idle connection."""
        for origin in self._origins.values():
            while origin.idle:
                _, writer, _ = origin.idle.pop()
                writer.close()
        self._origins.clear()
