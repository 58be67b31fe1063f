"""Unusual-consumption alert conditions: Prometheus gauges and audit entries.

Three conditions, each a ``fedllm_router_alert_*`` gauge that is 1 while it holds (so
Prometheus alerting rules, deploy/prometheus/alerts.yml, need no thresholds of their own) and an
``alert_raised`` / ``alert_cleared`` audit entry whenever it starts or stops holding:

- unusual spending, from the budget database's settlement history: every replica reads every
  replica's charges, so each replica reaches the same verdict;
- a burst of quota refusals and repeated authentication failures, from this replica's own
  request and auth-failure counters: per replica by design (each replica's gauge covers the
  traffic it served; the rules alert on any replica).

A condition that cannot be evaluated (budget database down) keeps its last value and logs;
the ledger's own 503s and error counter already report the outage.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import Counter

from fedllm.serving.router.budgets import BudgetLedger, LedgerUnavailableError
from fedllm.serving.router.config import AlertsConfig
from fedllm.serving.router.metrics import RouterMetrics

log = structlog.get_logger(__name__)

REFUSED_ENDPOINT = "/v1/inference"
REFUSED_STATUS = "403"

Audit = Callable[..., Awaitable[None]]


class _WindowedCount:
    """Increase of a monotonically growing count over a sliding time window."""

    def __init__(self, window_s: float, now: float, value: float) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, float]] = deque([(now, value)])

    def increase(self, now: float, value: float) -> float:
        """Record `value` at `now`; return how much it grew within the last window."""
        self._samples.append((now, value))
        # keep the newest sample at or before the window start as the baseline
        while len(self._samples) > 1 and self._samples[1][0] <= now - self._window_s:
            self._samples.popleft()
        return value - self._samples[0][1]


def _counter_total(counter: Counter) -> float:
    """Sum of a labelled counter over every label set."""
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


class AlertMonitor:
    """Evaluates the alert conditions of one router replica."""

    def __init__(
        self,
        config: AlertsConfig,
        budgets: BudgetLedger,
        metrics: RouterMetrics,
        audit: Audit,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._budgets = budgets
        self._metrics = metrics
        self._audit = audit
        self._clock = clock
        now = clock()
        self._refused = _WindowedCount(config.refused_window_s, now, self._refusals())
        self._auth = _WindowedCount(
            config.auth_failures_window_s, now, _counter_total(metrics.auth_failures)
        )
        self._flagged_users: set[str] = set()
        self._active: dict[str, bool] = {"refused_burst": False, "auth_failures": False}

    def _refusals(self) -> float:
        value = self._metrics.registry.get_sample_value(
            "fedllm_router_requests_total",
            {"endpoint": REFUSED_ENDPOINT, "status": REFUSED_STATUS},
        )
        return value or 0.0

    async def run(self) -> None:
        """Evaluate every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self._config.interval_s)
            await self.evaluate()

    async def evaluate(self) -> None:
        """Update every gauge; audit each condition that started or stopped holding."""
        now = self._clock()
        refused = self._refused.increase(now, self._refusals())
        await self._set(
            "refused_burst",
            refused > self._config.refused_threshold,
            self._metrics.alert_refused_burst,
            refused=int(refused),
            threshold=self._config.refused_threshold,
            window_s=self._config.refused_window_s,
        )
        failures = self._auth.increase(now, _counter_total(self._metrics.auth_failures))
        await self._set(
            "auth_failures",
            failures > self._config.auth_failures_threshold,
            self._metrics.alert_auth_failures,
            failures=int(failures),
            threshold=self._config.auth_failures_threshold,
            window_s=self._config.auth_failures_window_s,
        )
        try:
            unusual = await asyncio.to_thread(self.unusual_spenders, now)
        except LedgerUnavailableError:
            log.warning("alert_evaluation_skipped", condition="unusual_spending")
            return
        for user, (recent, average) in sorted(unusual.items()):
            if user not in self._flagged_users:
                await self._audit(
                    "alert_raised",
                    condition="unusual_spending",
                    user=user,
                    epsilon_recent=recent,
                    epsilon_average=average,
                    factor=self._config.spending_factor,
                    window_s=self._config.spending_window_s,
                )
        for user in sorted(self._flagged_users - set(unusual)):
            await self._audit("alert_cleared", condition="unusual_spending", user=user)
        self._flagged_users = set(unusual)
        self._metrics.alert_unusual_spending.set(1 if unusual else 0)
        self._metrics.alert_unusual_spending_users.set(len(unusual))

    def unusual_spenders(self, now: float) -> dict[str, tuple[float, float]]:
        """Users whose charges in the last window exceed ``spending_factor`` × their average
        per window over the baseline windows before it: user → (recent ε, average ε)."""
        config = self._config
        window = config.spending_window_s
        start = now - window
        recent = self._budgets.charged_by_user(start, now)
        baseline = self._budgets.charged_by_user(
            start - window * config.spending_baseline_windows, start
        )
        flagged = {}
        for user, spent in recent.items():
            average = baseline.get(user, 0.0) / config.spending_baseline_windows
            if spent >= config.spending_min_epsilon and spent > config.spending_factor * average:
                flagged[user] = (spent, average)
        return flagged

    async def _set(self, condition: str, holds: bool, gauge: Any, **figures: Any) -> None:
        gauge.set(1 if holds else 0)
        if holds != self._active[condition]:
            self._active[condition] = holds
            await self._audit(
                "alert_raised" if holds else "alert_cleared", condition=condition, **figures
            )
