"""What the router does for one request: route and fail over, or run a charged consensus.

Budget rules (fail closed):

- Plain answers come from the DP-trained global model (post-processing): 0 ε, no reservation.
- A consensus answer costs ``ConsensusMechanism.epsilon_cost(max_tokens, δ)``. Every check
  that can refuse it runs first (enough hospitals, one node each, whose floors and limits
  accept the request; the user's ``privacy_budget``); then it is reserved against the user's
  and the department's quota (the department from the token, never from the request) *before*
  any hospital is contacted, committed once any hospital ballot was used, and refunded when none
  was (every hospital refused or failed before voting). A ledger failure refuses the request
  (503): no quota bookkeeping, no consensus. The audit entry names every hospital ledger charged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from fedllm.security.tokens import Principal
from fedllm.serving.router.budgets import LedgerUnavailableError, QuotaExceededError, Reservation
from fedllm.serving.router.cache import cache_key
from fedllm.serving.router.errors import ApiError
from fedllm.serving.router.node_pool import NodeCallError
from fedllm.serving.router.policies import POLICIES, privacy_aware
from fedllm.serving.router.state import RouterState
from fedllm.serving.router.voting import ConsensusError, ConsensusRun, choose_voters
from fedllm.serving.schemas import POST_PROCESSING_NOTE, InferenceRequest

log = structlog.get_logger(__name__)

CONSENSUS_NOTE = (
    "GNMax consensus of hospitals' local models: each participating hospital's ledger was "
    "charged ε={epsilon:.6g} (δ={delta:g}) for up to {max_tokens} tokens, and so was your quota"
)
# Response headers must be latin-1; the JSON bodies keep the Unicode ε.
ASCII_NOTE = POST_PROCESSING_NOTE.replace("ε", "epsilon")
QUOTA_STATUS = 403
# Quotas are kept in integer micro-ε (costs round up): a smaller shortfall is left to the ledger.
QUOTA_ROUNDING = 2e-6


def privacy_headers(cost: float) -> dict[str, str]:
    """X-Privacy-Cost / X-Privacy-Note for OpenAI-shaped answers (their bodies are OpenAI's)."""
    return {"X-Privacy-Cost": f"{cost:g}", "X-Privacy-Note": ASCII_NOTE}


class Forwarded:
    """A node's successful JSON answer and which node gave it."""

    __slots__ = ("body", "node_id")

    def __init__(self, body: dict[str, Any], node_id: str) -> None:
        self.body = body
        self.node_id = node_id


async def forward(
    state: RouterState, path: str, payload: dict[str, Any], department: str | None
) -> Forwarded:
    """POST to nodes in policy order, failing over on network errors, timeouts and 5xx.

    A 4xx is the caller's problem (another node would say the same): it is passed back as is.
    """
    name = state.config.routing.policy
    with state.tracing.span("router.route", {"fedllm.policy": name}) as span:
        candidates = POLICIES[name](state.pool.nodes, department)
        span.set_attribute("fedllm.candidates", len(candidates))
    if not candidates:
        state.metrics.errors.labels(reason="no_healthy_node").inc()
        raise ApiError(503, "no healthy hospital node is available; try again shortly")
    attempts = candidates[: state.config.routing.retries + 1]
    for node in attempts:
        try:
            response = await state.pool.call(node, path, payload)
        except NodeCallError as error:
            state.metrics.node_failures.labels(node_id=node.node_id).inc()
            log.warning("node_call_failed", node_id=node.node_id, path=path, reason=error.reason)
            continue
        if response.status_code == 200:
            return Forwarded(response.json(), node.node_id)
        detail = _detail(response)
        raise ApiError(response.status_code, detail)
    state.metrics.errors.labels(reason="all_nodes_failed").inc()
    raise ApiError(503, f"{len(attempts)} hospital node(s) failed to answer; try again shortly")


def _detail(response: Any) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return detail if detail is not None else f"hospital node answered HTTP {response.status_code}"


def effective_remaining(quota: Any) -> float:
    """What the user can still spend: the smaller of their and their department's remaining ε."""
    return min(quota.remaining, quota.department_remaining)


async def plain_inference(
    state: RouterState, principal: Principal, request: InferenceRequest
) -> tuple[dict[str, Any], bool]:
    """A 0-ε answer of the global model; returns (body, served_from_cache)."""
    started = time.perf_counter()
    payload = request.model_dump(exclude={"department"})
    cacheable = request.temperature == 0 and state.cache.enabled
    key = cache_key(principal.subject, "/v1/inference", payload) if cacheable else ""
    body = state.cache.get(key) if cacheable else None
    hit = body is not None
    if cacheable:
        (state.metrics.cache_hits if hit else state.metrics.cache_misses).inc()
    if body is None:
        forwarded = await forward(
            state, "/v1/inference", payload, request.department or principal.department
        )
        body = forwarded.body
        body["node_id"] = forwarded.node_id
        body["privacy_cost"] = 0.0
        body["privacy_note"] = POST_PROCESSING_NOTE
        if cacheable:
            state.cache.put(key, dict(body))
    body = dict(body)
    try:
        quota = await state.budget_status(principal.subject, principal.department)
        body["remaining_budget"] = effective_remaining(quota)
    except LedgerUnavailableError:
        body["remaining_budget"] = None
    body["processing_time"] = time.perf_counter() - started
    return body, hit


async def consensus_inference(
    state: RouterState, principal: Principal, request: InferenceRequest
) -> dict[str, Any]:
    """A charged GNMax consensus answer (reserve → consensus → commit or refund), one span."""
    with state.tracing.span("router.consensus", {"fedllm.max_tokens": request.max_tokens}) as span:
        answer = await _consensus_inference(state, principal, request)
        span.set_attribute("fedllm.epsilon", answer["privacy_cost"])
        span.set_attribute("fedllm.consensus_reached", answer["consensus_reached"])
        return answer


async def _consensus_inference(
    state: RouterState, principal: Principal, request: InferenceRequest
) -> dict[str, Any]:
    """`consensus_inference` inside its span (every exit, refusals included, ends the span)."""
    started = time.perf_counter()
    budgets = state.config.budgets
    with state.tracing.span("router.route", {"fedllm.policy": "privacy-aware"}) as span:
        choice = choose_voters(
            privacy_aware(state.pool.nodes), state.consensus, request.prompt, request.max_tokens
        )
        span.set_attribute("fedllm.voters", len(choice.voters))
    refusal = choice.refusal(state.consensus)
    if refusal is not None:
        state.metrics.errors.labels(reason="consensus_unavailable").inc()
        raise ApiError(*refusal)
    # a closed form for the default accountants (microseconds), cached for the others
    cost = state.consensus.mechanism.epsilon_cost(
        request.max_tokens, budgets.delta, budgets.accountant
    )
    if request.privacy_budget is not None and cost > request.privacy_budget:
        raise ApiError(
            400,
            f"a consensus answer of up to {request.max_tokens} tokens costs ε={cost:.6g} "
            f"(δ={budgets.delta:g}), more than privacy_budget={request.privacy_budget:g}; "
            "lower max_tokens or raise privacy_budget",
        )
    await _refuse_short_quota(state, principal, cost)
    reservation = await _reserve(state, principal, cost)
    run = ConsensusRun(state.pool, state.consensus, choice.voters)
    try:
        outcome = await run.run(request.prompt, request.max_tokens)
    except ConsensusError as error:
        await _settle_failed(state, principal, reservation, error, request.prompt)
        state.metrics.errors.labels(reason="consensus_failed").inc()
        raise ApiError(error.status_code, error.detail) from None
    except BaseException:
        await _settle(state, reservation, commit=run.votes_cast)
        await state.audit(
            "consensus_aborted",
            user=principal.subject,
            department=principal.department,
            epsilon=cost,
            reservation=reservation.id,
            charged_ledgers=[charged.as_audit() for charged in run.charged],
            quota_charged=run.votes_cast,
        )
        raise
    await _settle(state, reservation, commit=True)
    state.metrics.budget_consumed.labels(department=principal.department).inc(cost)
    await state.audit(
        "consensus_charge",
        user=principal.subject,
        department=principal.department,
        epsilon=cost,
        delta=budgets.delta,
        max_tokens=request.max_tokens,
        session_id=run.session_id,
        nodes=outcome.participants,
        charged_ledgers=[charged.as_audit() for charged in outcome.charged],
        refused_nodes=outcome.refused_nodes,
        reservation=reservation.id,
        prompt=request.prompt,
    )
    try:
        quota = await state.budget_status(principal.subject, principal.department)
        remaining: float | None = effective_remaining(quota)
    except LedgerUnavailableError:
        remaining = None
    return {
        "response": outcome.text,
        "privacy_cost": cost,
        "remaining_budget": remaining,
        "node_id": ",".join(outcome.participants),
        "processing_time": time.perf_counter() - started,
        "consensus_reached": outcome.consensus_reached,
        "confidence_score": outcome.confidence_score,
        "privacy_note": CONSENSUS_NOTE.format(
            epsilon=cost, delta=budgets.delta, max_tokens=request.max_tokens
        ),
        "model_version": outcome.model_version,
    }


async def _quota_refusal(
    state: RouterState,
    principal: Principal,
    error: QuotaExceededError,
) -> ApiError:
    """Audit a refusal for quota and return the 403 that reports it."""
    await state.audit(
        "quota_exceeded",
        user=principal.subject,
        department=principal.department,
        scope=error.scope,
        requested=error.requested,
        remaining=error.remaining,
    )
    return ApiError(
        QUOTA_STATUS,
        f"privacy quota exceeded ({error.scope} {error.name!r}): this answer costs "
        f"ε={error.requested:.6g}, remaining ε={error.remaining:.6g} until "
        f"{error.period_end.isoformat()}",
    )


async def _refuse_short_quota(state: RouterState, principal: Principal, cost: float) -> None:
    """Refuse from the budget view (cached up to 2 s) when it already shows too little left.

    A user who has run out is refused without a write transaction: a burst of such requests
    must not queue behind the database's write lock. The view can only be stale by what other
    routers spent or refunded since it was read; a refusal needs a shortfall beyond the
    micro-ε rounding, and anything that passes here is decided by the atomic reservation.
    """
    try:
        quota = await state.budget_status(principal.subject, principal.department)
    except LedgerUnavailableError:
        return  # the reservation decides, and fails closed
    shortfalls = [
        ("user", principal.subject, quota.remaining),
        ("department", principal.department, quota.department_remaining),
    ]
    for scope, name, remaining in shortfalls:
        if cost > remaining + QUOTA_ROUNDING:
            error = QuotaExceededError(scope, name, cost, remaining, quota.period_end)
            raise await _quota_refusal(state, principal, error)


async def _reserve(state: RouterState, principal: Principal, cost: float) -> Reservation:
    try:
        with state.tracing.span("router.quota.reserve", {"fedllm.epsilon": cost}):
            reservation = await asyncio.to_thread(
                state.budgets.reserve, principal.subject, principal.department, cost
            )
    except QuotaExceededError as error:
        raise await _quota_refusal(state, principal, error) from None
    except LedgerUnavailableError:
        state.metrics.errors.labels(reason="ledger_unavailable").inc()
        raise ApiError(503, "privacy budget ledger unavailable; request refused") from None
    state.forget_budget(principal.subject)
    return reservation


async def _settle(state: RouterState, reservation: Reservation, *, commit: bool) -> None:
    """Commit or refund; a ledger failure here leaves the reservation held (fail safe)."""
    settle = state.budgets.commit if commit else state.budgets.refund
    name = "router.quota.commit" if commit else "router.quota.refund"
    try:
        with state.tracing.span(name, {"fedllm.epsilon": reservation.epsilon}):
            await asyncio.to_thread(settle, reservation)
    except LedgerUnavailableError:
        state.metrics.errors.labels(reason="ledger_unavailable").inc()
        log.error("budget_settlement_failed", reservation=reservation.id, commit=commit)
    state.forget_budget(reservation.user_id)


async def _settle_failed(
    state: RouterState,
    principal: Principal,
    reservation: Reservation,
    error: ConsensusError,
    prompt: str,
) -> None:
    """A failed consensus: charge the quota only if a hospital vote was used."""
    await _settle(state, reservation, commit=error.votes_cast)
    if error.votes_cast:
        state.metrics.budget_consumed.labels(department=principal.department).inc(
            reservation.epsilon
        )
    await state.audit(
        "consensus_failed_charged" if error.votes_cast else "consensus_refund",
        user=principal.subject,
        department=principal.department,
        epsilon=reservation.epsilon,
        reservation=reservation.id,
        charged_ledgers=[charged.as_audit() for charged in error.charged],
        reason=error.detail,
        prompt=prompt,
    )
