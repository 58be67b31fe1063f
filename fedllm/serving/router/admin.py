"""PUT /v1/admin/config: what an admin may change at runtime, and applying it.

Quotas go to the budget database (persisted, shared by every router); the routing policy,
rate limits and cache settings change this router process only and last until it restarts
(the YAML stays the source of truth for those).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from fedllm.config.schema import StrictModel
from fedllm.security.ratelimit import RateLimiter
from fedllm.serving.router.config import RoutingPolicyName
from fedllm.serving.router.state import RouterState


class RateLimitUpdate(StrictModel):
    """New per-user token bucket."""

    requests_per_s: PositiveFloat
    burst: PositiveInt


class AdminConfigUpdate(StrictModel):
    """Every field is optional; only the ones given change."""

    routing_policy: RoutingPolicyName | None = None
    user_quotas: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    department_quotas: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    rate_limit: RateLimitUpdate | None = None
    cache_ttl_s: NonNegativeFloat | None = None
    cache_max_entries: int | None = Field(None, ge=0)


def apply_quotas(state: RouterState, update: AdminConfigUpdate) -> dict[str, Any]:
    """Persist quota changes (blocking database writes: call from a worker thread)."""
    for user_id, epsilon in update.user_quotas.items():
        state.budgets.set_user_quota(user_id, epsilon)
    for department, epsilon in update.department_quotas.items():
        state.budgets.set_department_quota(department, epsilon)
    applied: dict[str, Any] = {}
    if update.user_quotas:
        applied["user_quotas"] = dict(update.user_quotas)
    if update.department_quotas:
        applied["department_quotas"] = dict(update.department_quotas)
    return applied


def apply_runtime(state: RouterState, update: AdminConfigUpdate) -> dict[str, Any]:
    """Change in-memory settings (call on the event loop, where requests read them)."""
    applied: dict[str, Any] = {}
    if update.routing_policy is not None:
        state.config.routing.policy = update.routing_policy
        applied["routing_policy"] = update.routing_policy
    if update.rate_limit is not None:
        state.limiter = RateLimiter(update.rate_limit.requests_per_s, update.rate_limit.burst)
        applied["rate_limit"] = update.rate_limit.model_dump()
    if update.cache_ttl_s is not None or update.cache_max_entries is not None:
        state.cache.reconfigure(max_entries=update.cache_max_entries, ttl_s=update.cache_ttl_s)
        applied["cache"] = {"max_entries": state.cache.max_entries, "ttl_s": state.cache.ttl_s}
    if update.user_quotas or update.department_quotas:
        state.forget_budget()
    return applied
