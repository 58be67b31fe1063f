"""Prometheus metrics, one registry per router app (so tests and several apps never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fedllm.serving.router.node_pool import NodeState

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RouterMetrics:
    """Every metric the router exports; names are prefixed ``fedllm_router_``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "fedllm_router_request_seconds",
            "Time from request received to response sent, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "fedllm_router_requests",
            "Requests by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "fedllm_router_errors",
            "Requests that failed on the router's side (no node, ledger down), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.node_failures = Counter(
            "fedllm_router_node_failures",
            "Failed calls to nodes (each triggers failover), by node.",
            ["node_id"],
            registry=self.registry,
        )
        self.budget_consumed = Counter(
            "fedllm_router_budget_epsilon_consumed",
            "ε committed against user quotas, by department.",
            ["department"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "fedllm_router_auth_failures",
            "Refused logins and tokens, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "fedllm_router_cache_hits", "Answers served from the cache.", registry=self.registry
        )
        self.cache_misses = Counter(
            "fedllm_router_cache_misses",
            "Cacheable requests not found in the cache.",
            registry=self.registry,
        )
        self.node_healthy = Gauge(
            "fedllm_router_node_healthy",
            "1 when the node is in rotation, 0 when taken out.",
            ["node_id"],
            registry=self.registry,
        )

        # Alert conditions (see fedllm/serving/router/alerts.py): 1 while the condition holds.
        self.alert_unusual_spending = Gauge(
            "fedllm_router_alert_unusual_spending",
            "1 while some user spends far above their own average (alerts.spending_*).",
            registry=self.registry,
        )
        self.alert_unusual_spending_users = Gauge(
            "fedllm_router_alert_unusual_spending_users",
            "How many users currently spend far above their own average.",
            registry=self.registry,
        )
        self.alert_refused_burst = Gauge(
            "fedllm_router_alert_refused_burst",
            "1 while quota refusals at this replica exceed alerts.refused_threshold per window.",
            registry=self.registry,
        )
        self.alert_auth_failures = Gauge(
            "fedllm_router_alert_auth_failures",
            "1 while refused logins and tokens at this replica exceed "
            "alerts.auth_failures_threshold per window.",
            registry=self.registry,
        )

    def observe_node(self, node: NodeState) -> None:
        """Mirror a node's health into the gauge."""
        self.node_healthy.labels(node_id=node.node_id).set(1 if node.healthy else 0)

    def render(self) -> bytes:
        """The text exposition format for GET /metrics."""
        return generate_latest(self.registry)
