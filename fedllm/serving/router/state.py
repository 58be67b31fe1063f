"""Everything one router app holds: configuration, stores, pool, cache, metrics, audit.

Built once by ``RouterState.build`` so every configuration mistake (missing key file, bad
database URL, audit log already open elsewhere) surfaces before the server starts listening.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import TTLCache

from fedllm.config.loading import ConfigError
from fedllm.privacy.consensus import ConsensusMechanism
from fedllm.security.audit import AuditLog, AuditLogError
from fedllm.security.ratelimit import RateLimiter
from fedllm.security.tokens import KeyLoadError, read_key_source
from fedllm.security.users import UserStore
from fedllm.serving.router.auth import LoginGate, RouterTokens, key_source
from fedllm.serving.router.budgets import BudgetLedger, BudgetStatus
from fedllm.serving.router.cache import ResponseCache
from fedllm.serving.router.config import AuditConfig, RouterConfig
from fedllm.serving.router.metrics import RouterMetrics
from fedllm.serving.router.node_pool import NodePool
from fedllm.serving.router.voting import ConsensusSettings
from fedllm.telemetry.tracing import Tracing

# Plain (0 ε) answers report the user's remaining quota from this short-lived view instead of
# reading the database on every request; any change made through this router invalidates it.
BUDGET_VIEW_TTL_S = 2.0
BUDGET_VIEW_SIZE = 10_000


def read_redaction_key(config: AuditConfig) -> bytes:
    """The audit log's HMAC key from its file or environment variable (never from the YAML)."""
    source = key_source(config.redaction_key_file, config.redaction_key_env)
    try:
        return read_key_source(source).strip()
    except KeyLoadError as error:
        raise ConfigError(f"audit: {error}") from None


@dataclass
class RouterState:
    """The router's components (one per app)."""

    config: RouterConfig
    tokens: RouterTokens
    users: UserStore
    budgets: BudgetLedger
    audit_log: AuditLog
    pool: NodePool
    cache: ResponseCache
    metrics: RouterMetrics
    limiter: RateLimiter
    logins: LoginGate
    consensus: ConsensusSettings
    budget_view: TTLCache[str, BudgetStatus]
    tracing: Tracing

    @classmethod
    def build(cls, config: RouterConfig) -> RouterState:
        """Load keys, open databases and the audit log; ConfigError on a user mistake."""
        try:
            tokens = RouterTokens(config.auth)
        except (KeyLoadError, ValueError) as error:
            raise ConfigError(f"auth: {error}") from None
        try:
            users = UserStore(
                config.database.url,
                max_failed_logins=config.auth.max_failed_logins,
                lockout_s=config.auth.lockout_s,
            )
            budgets = BudgetLedger(
                config.database.url,
                user_quota=config.budgets.user_quota,
                department_quota=config.budgets.department_quota,
                period_s=config.budgets.period_s,
                quota_overrides=config.budgets.quota_overrides,
            )
        except ValueError as error:
            raise ConfigError(f"database.url: {error}") from None
        try:
            audit_log = AuditLog(
                Path(config.audit.path),
                read_redaction_key(config.audit),
                failure_window_s=config.audit.failure_window_s,
            )
        except (AuditLogError, ValueError, OSError) as error:
            raise ConfigError(f"audit: {error}") from None
        metrics = RouterMetrics()
        tracing = Tracing.from_config(config.tracing, "fedllm-router", "fedllm.router")
        try:
            mechanism = ConsensusMechanism(
                vote_noise_std=config.consensus.vote_noise_std,
                threshold=config.consensus.threshold,
            )
            pool = NodePool(
                config.nodes,
                config.routing,
                tls=config.node_tls,
                limits=config.limits,
                on_health=metrics.observe_node,
                tracing=tracing,
            )
        except (ValueError, OSError) as error:
            audit_log.close()
            tracing.shutdown()
            raise ConfigError(f"nodes: {error}") from None
        return cls(
            config=config,
            tokens=tokens,
            users=users,
            budgets=budgets,
            audit_log=audit_log,
            pool=pool,
            cache=ResponseCache(config.cache.max_entries, config.cache.ttl_s),
            metrics=metrics,
            limiter=RateLimiter(config.rate_limit.requests_per_s, config.rate_limit.burst),
            logins=LoginGate(
                users,
                rate=config.rate_limit,
                auth=config.auth,
                audit_log=audit_log,
                failures=metrics.auth_failures,
            ),
            consensus=ConsensusSettings(
                mechanism=mechanism,
                top_k=config.consensus.top_k,
                min_nodes=config.consensus.min_nodes,
                max_nodes=config.consensus.max_nodes,
            ),
            budget_view=TTLCache(maxsize=BUDGET_VIEW_SIZE, ttl=BUDGET_VIEW_TTL_S),
            tracing=tracing,
        )

    async def audit(self, event: str, **fields: Any) -> None:
        """Append to the audit log off the event loop (each entry is fsynced)."""
        await asyncio.to_thread(self.audit_log.record, event, **fields)

    async def budget_status(self, user_id: str, department: str) -> BudgetStatus:
        """The user's budget, from the short-lived view when fresh."""
        key = f"{user_id}\x00{department}"
        cached = self.budget_view.get(key)
        if cached is not None:
            return cached
        status = await asyncio.to_thread(self.budgets.status, user_id, department)
        self.budget_view[key] = status
        return status

    def forget_budget(self, user_id: str | None = None) -> None:
        """Drop cached budget views (one user's, or all after a quota change)."""
        if user_id is None:
            self.budget_view.clear()
            return
        for key in [key for key in self.budget_view if key.startswith(f"{user_id}\x00")]:
            self.budget_view.pop(key, None)

    def close(self) -> None:
        """Release the hashing pool, the audit log's file lock and database connections, and
        export the spans still buffered."""
        self.logins.close()
        self.tracing.shutdown()
        self.audit_log.close()
        self.users.close()
        self.budgets.close()
