"""Pure ASGI middleware for every request: latency histogram and status counter.

Written against raw ASGI rather than ``@app.middleware("http")`` because Starlette's
BaseHTTPMiddleware runs each request through extra tasks and memory streams, which costs a
noticeable share of the router's per-request budget.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedllm.serving.router.metrics import RouterMetrics

ENDPOINTS = frozenset(
    {
        "/v1/auth/token",
        "/v1/inference",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/health",
        "/v1/ready",
        "/v1/admin/nodes",
        "/v1/admin/config",
        "/metrics",
    }
)
BUDGET_PREFIX = "/v1/privacy/budget/"
NODE_PREFIX = "/v1/admin/nodes/"


def endpoint_label(path: str) -> str:
    """A bounded metrics label for a request path (user ids never become labels)."""
    if path in ENDPOINTS:
        return path
    if path.startswith(BUDGET_PREFIX):
        return BUDGET_PREFIX + "{user_id}"
    if path.startswith(NODE_PREFIX):
        return NODE_PREFIX + "{node_id}"
    return "other"


class ObserveMiddleware:
    """Record latency and status per endpoint (size and time limits: `BodyGuardMiddleware`)."""

    def __init__(self, app: ASGIApp, *, metrics: RouterMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        endpoint = endpoint_label(scope["path"])
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.request_latency.labels(endpoint=endpoint).observe(
                time.perf_counter() - started
            )
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
