"""The router's HTTP API: ``create_router_app(config) -> FastAPI``.

Endpoints (all JSON; errors are ``{"detail": ...}``):

- ``POST /v1/auth/token``: username + password (form or JSON) → bearer token.
- ``POST /v1/inference``: the seed contract; plain (0 ε) or consensus (charged) answers.
- ``POST /v1/completions``, ``POST /v1/chat/completions``: OpenAI-compatible, 0 ε.
- ``GET /v1/privacy/budget/{user_id}``: own budget (admins: anyone's).
- ``GET /v1/privacy/budget/{user_id}/history``: own charges and refunds, paginated (admins:
  anyone's).
- ``GET /v1/admin/budget/users?above=``, ``GET /v1/admin/budget/departments?since=&until=``:
  admins only; users near their quota, department usage over a period.
- ``GET /v1/health``, ``GET /metrics``: unauthenticated, for load balancers and Prometheus.
- ``GET /v1/ready``: unauthenticated readiness, 503 while the database or every node is down.
- ``POST /v1/admin/nodes``, ``DELETE /v1/admin/nodes/{node_id}``, ``PUT /v1/admin/config``:
  admins only, audited whether they succeed or are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qs

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from fedllm.config.loading import ConfigError, validate_model
from fedllm.security.tokens import Principal, TokenError
from fedllm.security.users import Role
from fedllm.serving.http_limits import install_http_guard
from fedllm.serving.router.admin import AdminConfigUpdate, apply_quotas, apply_runtime
from fedllm.serving.router.alerts import AlertMonitor
from fedllm.serving.router.budgets import LedgerUnavailableError
from fedllm.serving.router.cache import cache_key
from fedllm.serving.router.config import NodeConfig, RouterConfig
from fedllm.serving.router.errors import (
    ApiError,
    error_body,
    install_error_handlers,
    retry_after,
)
from fedllm.serving.router.middleware import ObserveMiddleware, endpoint_label
from fedllm.serving.router.node_store import NodeStore, NodeStoreError
from fedllm.serving.router.service import (
    consensus_inference,
    effective_remaining,
    forward,
    plain_inference,
    privacy_headers,
)
from fedllm.serving.router.state import RouterState
from fedllm.serving.schemas import ChatCompletionRequest, CompletionRequest, InferenceRequest
from fedllm.telemetry.tracing import TraceMiddleware

log = structlog.get_logger(__name__)

_CHALLENGE = {"WWW-Authenticate": "Bearer"}
# The names /v1/ready reads a budget status for: a read-only query through the quota tables.
READINESS_PROBE = "readiness-probe"


def client_address(request: Request) -> str:
    """The peer address (the router is meant to be reached directly, not via a proxy)."""
    return request.client.host if request.client else "unknown"


def _state(request: Request) -> RouterState:
    return request.app.state.router


async def authenticated(request: Request) -> Principal:
    """The bearer token's principal, rate-limited per user; 401/429 otherwise."""
    state = _state(request)
    with state.tracing.span("router.auth") as span:
        principal = _authenticate(state, request)
        span.set_attribute("fedllm.role", str(principal.role))
        return principal


def _authenticate(state: RouterState, request: Request) -> Principal:
    """`authenticated` without its span (which must never see the token or the user's name)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        state.metrics.auth_failures.labels(reason="missing token").inc()
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)", _CHALLENGE)
    try:
        principal = state.tokens.verify(token.strip())
    except TokenError as error:
        state.metrics.auth_failures.labels(reason=error.reason).inc()
        state.audit_log.count_failure("bad_token", client_address(request), reason=error.reason)
        raise ApiError(401, f"invalid token: {error.reason}", _CHALLENGE) from None
    wait = state.limiter.try_acquire(f"user:{principal.issuer}:{principal.subject}")
    if wait > 0:
        raise ApiError(429, "rate limit exceeded; slow down", retry_after(wait))
    return principal


UserPrincipal = Annotated[Principal, Depends(authenticated)]


async def admin(request: Request, principal: UserPrincipal) -> Principal:
    """Admins only (403 and an audit entry otherwise)."""
    if principal.role != Role.ADMIN:
        await _state(request).audit("admin_denied", user=principal.subject, path=request.url.path)
        raise ApiError(403, "admin role required")
    return principal


AdminPrincipal = Annotated[Principal, Depends(admin)]


async def _json_body(request: Request, model: type[BaseModel]) -> Any:
    """Parse and validate a JSON body; 422 with field errors (never the values) otherwise."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise _validation_error(error) from None


def _validation_error(error: ValidationError) -> ApiError:
    problems = [
        {"loc": list(item["loc"]), "msg": item["msg"], "type": item["type"]}
        for item in error.errors(include_url=False, include_context=False, include_input=False)
    ]
    return _UnprocessableError(problems)


class _UnprocessableError(ApiError):
    """A 422 whose detail is a list of field problems (FastAPI's shape)."""

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        super().__init__(422, "invalid request")
        self.detail = problems  # type: ignore[assignment]


def _json(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False, allow_nan=False),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def create_router_app(config: RouterConfig) -> FastAPI:
    """The router app; keys, databases and audit log are opened here (ConfigError if bad).

    Nodes are the YAML's with the admin API's stored changes applied (see `NodeStore`).
    """
    try:
        store = NodeStore(config.database.url)
        nodes = store.effective_nodes(config.nodes)
    except (ValueError, NodeStoreError) as error:
        raise ConfigError(f"database.url: {error}") from None
    raw = config.model_dump()
    raw["nodes"] = [node.model_dump() for node in nodes]
    try:
        config = validate_model(
            RouterConfig, raw, "router config + nodes stored by the admin API", what="config"
        )
    except ConfigError:
        store.close()
        raise
    state = RouterState.build(config)
    alerts = AlertMonitor(config.alerts, state.budgets, state.metrics, state.audit)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await state.pool.start()
        for node in state.pool.nodes:
            state.metrics.observe_node(node)
        watcher = asyncio.create_task(alerts.run()) if config.alerts.enabled else None
        log.info("router_started", nodes=len(state.pool.nodes), policy=config.routing.policy)
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await state.pool.stop()
            state.close()
            store.close()
            log.info("router_stopped")

    app = FastAPI(
        title="fedllm router",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.router = state
    install_error_handlers(app)
    _install_middleware(app, state)
    _auth_routes(app, state)
    _inference_routes(app, state)
    _info_routes(app, state)
    _admin_routes(app, state, store)
    _budget_report_routes(app, state)
    return app


def _install_middleware(app: FastAPI, state: RouterState) -> None:
    """Body limits inside, observation outside (so 408/413 answers are counted too), and the
    request's server span outermost when tracing is on (absent otherwise: no cost)."""
    install_http_guard(app, state.config.limits, error_body)
    app.add_middleware(ObserveMiddleware, metrics=state.metrics)
    if state.tracing.enabled:
        app.add_middleware(TraceMiddleware, tracing=state.tracing, route=endpoint_label)


def _auth_routes(app: FastAPI, state: RouterState) -> None:
    @app.post("/v1/auth/token")
    async def issue_token(request: Request) -> Response:
        """Exchange a username and password for a short-lived bearer token."""
        client = client_address(request)
        state.logins.admit(client)
        username, password = await _credentials(request)
        user = await state.logins.authenticate(username, password, client)
        token = state.tokens.issuer.issue(user)
        await state.audit(
            "token_issued",
            user=user.username,
            role=str(user.role),
            department=user.department,
            client=client,
        )
        return _json(
            {"access_token": token, "token_type": "bearer", "expires_in": state.tokens.ttl_s}
        )


async def _credentials(request: Request) -> tuple[str, str]:
    """username and password from a JSON or form body; 422 if either is missing."""
    raw = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    data: Any
    if content_type == "application/x-www-form-urlencoded":
        form = parse_qs(raw.decode("utf-8", errors="replace"), keep_blank_values=True)
        data = {key: values[0] for key, values in form.items()}
    else:
        try:
            data = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(
                422, "body must be JSON or form data with username and password"
            ) from None
    if not isinstance(data, dict):
        raise ApiError(422, "body must be an object with username and password")
    username, password = data.get("username"), data.get("password")
    if not isinstance(username, str) or not isinstance(password, str) or not username:
        raise ApiError(422, "username and password are required strings")
    return username, password


def _inference_routes(app: FastAPI, state: RouterState) -> None:
    @app.post("/v1/inference")
    async def inference(request: Request, principal: UserPrincipal) -> Response:
        """A plain (0 ε) or consensus (charged) answer."""
        body = await _json_body(request, InferenceRequest)
        if body.require_consensus:
            answer = await consensus_inference(state, principal, body)
            return _json(answer)
        answer, hit = await plain_inference(state, principal, body)
        return _json(answer, headers={"X-Cache": "hit" if hit else "miss"})

    async def openai_proxy(
        request: Request, principal: Principal, path: str, model: type[BaseModel]
    ) -> Response:
        body = await _json_body(request, model)
        reason = body.unsupported_reason()
        if reason is not None:
            raise ApiError(400, reason)
        payload = body.model_dump(exclude_none=True)
        cacheable = body.temperature == 0 and body.seed is None and state.cache.enabled
        key = cache_key(principal.subject, path, payload) if cacheable else ""
        answer = state.cache.get(key) if cacheable else None
        hit = answer is not None
        if cacheable:
            (state.metrics.cache_hits if hit else state.metrics.cache_misses).inc()
        if answer is None:
            forwarded = await forward(state, path, payload, principal.department)
            answer = forwarded.body
            if cacheable:
                state.cache.put(key, answer)
        headers = privacy_headers(0.0)
        headers["X-Cache"] = "hit" if hit else "miss"
        return _json(answer, headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request, principal: UserPrincipal) -> Response:
        """OpenAI-compatible text completion from the DP global model (0 ε)."""
        return await openai_proxy(request, principal, "/v1/completions", CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, principal: UserPrincipal) -> Response:
        """OpenAI-compatible chat completion from the DP global model (0 ε)."""
        return await openai_proxy(request, principal, "/v1/chat/completions", ChatCompletionRequest)


def _info_routes(app: FastAPI, state: RouterState) -> None:
    @app.get("/v1/privacy/budget/{user_id}")
    async def budget(
        user_id: str, principal: UserPrincipal, department: str | None = None
    ) -> Response:
        """A user's quota use this period; only your own unless you are an admin.

        ``?department=`` reads another department's remaining quota, so it is for admins (or
        a user naming their own department).
        """
        is_admin = principal.role == Role.ADMIN
        if user_id != principal.subject and not is_admin:
            await state.audit("budget_read_denied", user=principal.subject, target=user_id)
            raise ApiError(403, "you may only read your own privacy budget")
        if department is not None and department != principal.department and not is_admin:
            await state.audit(
                "budget_read_denied", user=principal.subject, target=user_id, department=department
            )
            raise ApiError(403, "only admins may read another department's privacy budget")
        if user_id == principal.subject and department is None:
            department = principal.department
        if department is None:
            user = await asyncio.to_thread(state.users.get, user_id)
            if user is None:
                raise ApiError(
                    404, f"unknown user {user_id!r}; pass ?department= for external users"
                )
            department = user.department
        try:
            status = await asyncio.to_thread(state.budgets.status, user_id, department)
        except LedgerUnavailableError:
            raise ApiError(503, "privacy budget ledger unavailable") from None
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        return _json(
            {
                "user_id": status.user_id,
                "department": status.department,
                "quota": status.quota,
                "spent": status.spent,
                "reserved": status.reserved,
                "remaining": status.remaining,
                "department_remaining": status.department_remaining,
                "effective_remaining": effective_remaining(status),
                "period_end": status.period_end.isoformat(),
            }
        )

    @app.get("/v1/health")
    async def health() -> Response:
        """Router status and every node's health as last probed."""
        nodes = [node.summary() for node in state.pool.nodes]
        healthy = sum(1 for node in nodes if node["healthy"])
        return _json(
            {
                "status": "ok" if healthy else "degraded",
                "nodes_healthy": healthy,
                "nodes_total": len(nodes),
                "routing_policy": state.config.routing.policy,
                "nodes": nodes,
            }
        )

    @app.get("/v1/ready")
    async def ready() -> Response:
        """Readiness (Kubernetes, load balancers): 503 while this replica cannot answer, i.e.
        its database is unreachable or no node is healthy, so traffic and rollouts wait for a
        replica that can. Liveness stays on /v1/health: an outage elsewhere is no reason to
        restart the router."""
        problems = []
        try:
            await asyncio.to_thread(state.budgets.status, READINESS_PROBE, READINESS_PROBE)
        except LedgerUnavailableError:
            problems.append("database unreachable")
        if not any(node.healthy for node in state.pool.nodes):
            problems.append("no healthy node")
        return _json({"ready": not problems, "problems": problems}, 503 if problems else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(state.metrics.render(), media_type=state.metrics.content_type)


def _admin_routes(app: FastAPI, state: RouterState, store: NodeStore) -> None:
    async def refused(event: str, principal: Principal, error: ApiError, **fields: Any) -> None:
        """Audit a refused admin change (the change itself is never applied)."""
        await state.audit(
            event,
            user=principal.subject,
            status=error.status_code,
            reason=error.detail if isinstance(error.detail, str) else _problems(error.detail),
            **fields,
        )

    @app.post("/v1/admin/nodes", status_code=201)
    async def add_node(request: Request, principal: AdminPrincipal) -> Response:
        """Register (or replace) a hospital node; stored, so it survives restarts; probed now."""
        try:
            node = await _json_body(request, NodeConfig)
            _check_node_transport(state, node)
            replaced = state.pool.get(node.node_id) is not None
            await asyncio.to_thread(store.save, node, principal.subject)
        except NodeStoreError:
            error = ApiError(503, "router database unavailable; node not added")
            await refused("admin_node_refused", principal, error)
            raise error from None
        except ApiError as error:
            await refused("admin_node_refused", principal, error)
            raise
        added = await state.pool.add_node(node)
        state.metrics.observe_node(added)
        await state.audit(
            "admin_node_added",
            user=principal.subject,
            node_id=node.node_id,
            url=node.url,
            replaced=replaced,
        )
        return _json(added.summary(), status_code=201)

    @app.delete("/v1/admin/nodes/{node_id}")
    async def remove_node(node_id: str, principal: AdminPrincipal) -> Response:
        """Take a node out of the router for good (stored, so it stays out after a restart)."""
        node = state.pool.get(node_id)
        if node is None:
            error = ApiError(404, f"unknown node {node_id!r}")
            await refused("admin_node_refused", principal, error, node_id=node_id[:128])
            raise error
        try:
            await asyncio.to_thread(store.remove, node_id, principal.subject)
        except NodeStoreError:
            error = ApiError(503, "router database unavailable; node not removed")
            await refused("admin_node_refused", principal, error, node_id=node_id)
            raise error from None
        state.pool.remove_node(node_id)
        state.metrics.node_healthy.remove(node_id)
        await state.audit("admin_node_removed", user=principal.subject, node_id=node_id)
        return _json({"removed": node_id, "url": node.url})

    @app.put("/v1/admin/config")
    async def update_config(request: Request, principal: AdminPrincipal) -> Response:
        """Change routing policy, quotas, rate limits or cache settings, all or nothing."""
        try:
            update = await _json_body(request, AdminConfigUpdate)
            try:
                applied = await asyncio.to_thread(apply_quotas, state, update)
            except LedgerUnavailableError:
                raise ApiError(503, "privacy budget ledger unavailable; nothing changed") from None
            except ValueError as error:
                raise ApiError(422, f"{error}; nothing changed") from None
        except ApiError as error:
            await refused("admin_config_refused", principal, error)
            raise
        applied.update(apply_runtime(state, update))
        await state.audit("admin_config_changed", user=principal.subject, changes=applied)
        return _json({"applied": applied})


def _check_node_transport(state: RouterState, node: NodeConfig) -> None:
    """With mutual TLS to the nodes, refuse plain HTTP: it would send prompts and consensus
    calls unauthenticated and unencrypted to whoever answers at that address."""
    tls = state.config.node_tls
    if tls is not None and tls.client_cert_file and not node.url.startswith("https://"):
        raise ApiError(
            422,
            f"node {node.node_id!r}: this router uses mutual TLS to its nodes (node_tls); "
            "plain http:// is refused, use https://",
        )


def _problems(detail: list[dict[str, Any]]) -> str:
    """Field problems as one line for the audit log (locations and messages, no values)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg')}"
        for item in detail
    )


def _parse_time(name: str, value: str | None, default: datetime) -> datetime:
    """An ISO 8601 query parameter as an aware UTC datetime (naive means UTC); 422 if invalid."""
    if value is None:
        return default
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(422, f"{name} must be an ISO 8601 time, e.g. 2026-01-31T00:00:00Z") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _budget_report_routes(app: FastAPI, state: RouterState) -> None:
    """Budget history (own or admin) and the admins' quota and department reports."""

    @app.get("/v1/privacy/budget/{user_id}/history")
    async def budget_history(
        user_id: str, principal: UserPrincipal, limit: int = 100, cursor: int | None = None
    ) -> Response:
        """A user's charges and refunds, newest first; pass ``next_cursor`` back as ``cursor``."""
        if user_id != principal.subject and principal.role != Role.ADMIN:
            await state.audit("budget_history_denied", user=principal.subject, target=user_id)
            raise ApiError(403, "you may only read your own privacy budget history")
        try:
            events, next_cursor = await asyncio.to_thread(
                state.budgets.history, user_id, limit=limit, before=cursor
            )
        except LedgerUnavailableError:
            raise ApiError(503, "privacy budget ledger unavailable") from None
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        return _json(
            {
                "user_id": user_id,
                "events": [
                    {
                        "kind": event.kind,
                        "epsilon": event.epsilon,
                        "mechanism": event.mechanism,
                        "request_id": event.request_id,
                        "department": event.department,
                        "time": event.at.isoformat(),
                    }
                    for event in events
                ],
                "next_cursor": next_cursor,
            }
        )

    @app.get("/v1/admin/budget/users")
    async def users_near_quota(principal: AdminPrincipal, above: float = 0.8) -> Response:
        """Users whose use this period is above ``above`` (a fraction) of their quota."""
        try:
            usages = await asyncio.to_thread(state.budgets.users_above, above)
        except LedgerUnavailableError:
            raise ApiError(503, "privacy budget ledger unavailable") from None
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        return _json(
            {
                "above": above,
                "users": [
                    {
                        "user_id": usage.user_id,
                        "quota": usage.quota,
                        "used": usage.used,
                        "fraction": usage.fraction,
                    }
                    for usage in usages
                ],
            }
        )

    @app.get("/v1/admin/budget/departments")
    async def department_usage(
        principal: AdminPrincipal, since: str | None = None, until: str | None = None
    ) -> Response:
        """ε charged and refunded per department in [since, until) (ISO 8601; default: the
        current refresh period up to now)."""
        now = datetime.now(UTC)
        period_start = datetime.fromtimestamp(
            (now.timestamp() // state.budgets.period_s) * state.budgets.period_s, tz=UTC
        )
        start = _parse_time("since", since, period_start)
        end = _parse_time("until", until, now)
        try:
            usages = await asyncio.to_thread(state.budgets.department_usage, start, end)
        except LedgerUnavailableError:
            raise ApiError(503, "privacy budget ledger unavailable") from None
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        return _json(
            {
                "since": start.isoformat(),
                "until": end.isoformat(),
                "departments": [
                    {
                        "department": usage.department,
                        "charged": usage.charged,
                        "charges": usage.charges,
                        "refunded": usage.refunded,
                        "refunds": usage.refunds,
                        "users": usage.users,
                    }
                    for usage in usages
                ],
            }
        )
