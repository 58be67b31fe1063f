"""Pure ASGI middleware for every request: size limit, latency histogram, status counter.

Written against raw ASGI rather than ``@app.middleware("http")`` because Starlette's
BaseHTTPMiddleware runs each request through extra tasks and memory streams, which costs a
noticeable share of the router's per-request budget.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedllm.serving.router.errors import ApiError
from fedllm.serving.router.metrics import RouterMetrics

ENDPOINTS = frozenset(
    {
        "/v1/auth/token",
        "/v1/inference",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/health",
        "/v1/admin/nodes",
        "/v1/admin/config",
        "/metrics",
    }
)
BUDGET_PREFIX = "/v1/privacy/budget/"


def endpoint_label(path: str) -> str:
    """A bounded metrics label for a request path (user ids never become labels)."""
    if path in ENDPOINTS:
        return path
    if path.startswith(BUDGET_PREFIX):
        return BUDGET_PREFIX + "{user_id}"
    return "other"


class ObserveMiddleware:
    """Refuse oversized bodies (413) and record latency and status per endpoint."""

    def __init__(self, app: ASGIApp, *, metrics: RouterMetrics, max_request_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        endpoint = endpoint_label(scope["path"])
        status = 500
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            status = 413
            await _send_413(send, self.max_bytes)
            self._observe(endpoint, status, started)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(413, f"request body larger than {self.max_bytes} bytes")
            return message

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, observed_send)
        finally:
            self._observe(endpoint, status, started)

    def _observe(self, endpoint: str, status: int, started: float) -> None:
        self.metrics.request_latency.labels(endpoint=endpoint).observe(
            time.perf_counter() - started
        )
        self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, max_bytes: int) -> None:
    body = f'{{"detail": "request body larger than {max_bytes} bytes"}}'.encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
