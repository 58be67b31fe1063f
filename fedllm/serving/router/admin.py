"""PUT /v1/admin/config: what an admin may change at runtime, and applying it.

Quotas go to the budget database (persisted, shared by every router); the routing policy,
rate limits and cache settings change this router process only and last until it restarts
(the YAML stays the source of truth for those).

An update is all or nothing: the whole body is validated (bounds, names) before anything
changes, quotas are then written in one database transaction, and the in-memory settings are
only changed after that transaction committed.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from fedllm.config.schema import StrictModel
from fedllm.security.ratelimit import RateLimiter
from fedllm.serving.router.config import (
    CacheEntries,
    CacheTtl,
    Quota,
    QuotaName,
    RoutingPolicyName,
)
from fedllm.serving.router.state import RouterState

MAX_RATE_PER_S = 1_000_000.0
MAX_BURST = 1_000_000
MAX_QUOTA_CHANGES = 1000


class RateLimitUpdate(StrictModel):
    """New per-user token bucket."""

    requests_per_s: float = Field(gt=0, le=MAX_RATE_PER_S, allow_inf_nan=False, strict=True)
    burst: int = Field(ge=1, le=MAX_BURST, strict=True)


class AdminConfigUpdate(StrictModel):
    """Every field is optional; only the ones given change. Bounds match the configuration's
    (a quota must fit the ledger's 64-bit micro-ε counters)."""

    routing_policy: RoutingPolicyName | None = None
    user_quotas: dict[QuotaName, Quota] = Field(default_factory=dict, max_length=MAX_QUOTA_CHANGES)
    department_quotas: dict[QuotaName, Quota] = Field(
        default_factory=dict, max_length=MAX_QUOTA_CHANGES
    )
    rate_limit: RateLimitUpdate | None = None
    cache_ttl_s: CacheTtl | None = None
    cache_max_entries: CacheEntries | None = None


def apply_quotas(state: RouterState, update: AdminConfigUpdate) -> dict[str, Any]:
    """Persist every quota change in one transaction (blocking: call from a worker thread)."""
    state.budgets.set_quotas(update.user_quotas, update.department_quotas)
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
