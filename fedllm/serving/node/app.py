"""The hospital inference server's HTTP API (FastAPI): generation, consensus votes, health,
readiness.

``create_node_app`` assembles the app: limits, error bodies, tracing, the shared
:class:`~fedllm.serving.node.state.NodeState` on ``app.state.node``, and the endpoint groups,
each an ``APIRouter`` of its own (:mod:`.probes`, :mod:`.completions`, :mod:`.ballots`, whose
docstrings say what each may release). Consensus calls spend the hospital's ε, so the
configuration only enables them behind client certificates (mutual TLS), or on loopback with an
explicit insecure flag. Logs never contain prompt or reply text.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.serving.http_limits import install_http_guard
from fedllm.serving.node import ballots, completions, probes
from fedllm.serving.node.backends import GenerationBackend
from fedllm.serving.node.config import NodeServerConfig
from fedllm.serving.node.state import NodeState
from fedllm.telemetry.tracing import TraceMiddleware, Tracing, known_route

log = structlog.get_logger(__name__)

# Span names: the node's own routes, anything else is "other".
NODE_ROUTES = frozenset(
    {
        "/v1/health",
        "/v1/ready",
        "/v1/inference",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/consensus/candidates",
        "/v1/consensus/open",
        "/v1/consensus/vote",
        "/v1/consensus/decode",
    }
)


def error_body(status_code: int, detail: Any) -> dict[str, Any]:
    """FastAPI's ``detail`` plus OpenAI's ``error`` object, so both kinds of client read it."""
    if isinstance(detail, str):
        message = detail
    else:
        message = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg')}" for item in detail
        )
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return {"detail": detail, "error": {"message": message, "type": kind, "code": status_code}}


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with location and message only: echoing ``input`` would copy prompts into replies
    (and from there into client logs)."""
    detail = [
        {"type": item.get("type"), "loc": list(item.get("loc", ())), "msg": item.get("msg")}
        for item in error.errors()
    ]
    return JSONResponse(status_code=422, content=error_body(422, detail))


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        status_code=error.status_code,
        content=error_body(error.status_code, error.detail),
        headers=error.headers,
    )


def create_probe_app(node_app: FastAPI) -> FastAPI:
    """An app serving only ``GET /v1/ready`` of ``node_app``, for the plain-HTTP probe port.

    It reveals whether the node is ready and why not, nothing else: no generation, no consensus,
    no remaining ε, so it needs no client certificate.
    """
    app = FastAPI(title="fedllm node probes", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.node = node_app.state.node
    app.get("/v1/ready")(probes.readiness)
    return app


def create_node_app(
    config: NodeServerConfig,
    backend: GenerationBackend,
    ledger: NodePrivacyLedger | None = None,
) -> FastAPI:
    """The node's FastAPI app; ``ledger`` None disables consensus (503 on open)."""
    if ledger is not None and not (
        config.authenticates_clients or config.consensus.insecure_loopback
    ):
        raise ValueError(
            "a privacy ledger enables consensus, which needs client authentication "
            "(tls.client_ca_file) or consensus.insecure_loopback"
        )
    app = FastAPI(
        title=f"fedllm node {config.node_id}",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_http_guard(app, config.limits, error_body)
    if ledger is not None and not config.authenticates_clients:
        log.warning(
            "node.consensus_unauthenticated",
            node_id=config.node_id,
            detail="consensus answers callers without client certificates "
            "(consensus.insecure_loopback): anyone on this machine can spend the hospital's ε",
        )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Continues the router's trace (W3C traceparent); exported at exit by the provider.
    tracing = Tracing.from_config(config.tracing, "fedllm-node", "fedllm.node")
    app.state.tracing = tracing
    app.state.node = NodeState(config, backend, ledger, tracing)
    if tracing.enabled:
        app.add_middleware(TraceMiddleware, tracing=tracing, route=known_route(NODE_ROUTES))
    for endpoints in (probes.router, completions.router, ballots.router):
        app.include_router(endpoints)
    return app
