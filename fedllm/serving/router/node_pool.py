"""The hospital nodes the router knows, their health, load and latency, and how to call them.

One pooled client (``http_client.NodeClient``: keep-alive connections, bounded per node,
optional mutual TLS) serves every node, so the hot path never pays a TCP or TLS handshake. A
background task probes ``/v1/health``: it takes failing nodes out of rotation and brings them
back once they answer, and it refreshes each node's remaining ε, which the privacy-aware
policy routes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from opentelemetry.trace import SpanKind

from fedllm.serving.router.config import LimitsConfig, NodeConfig, NodeTLSConfig, RoutingConfig
from fedllm.serving.router.http_client import (
    NodeClient,
    NodeConnectError,
    NodeResponse,
    NodeTimeoutError,
    NodeTransportError,
)
from fedllm.telemetry.tracing import DISABLED, Tracing

log = structlog.get_logger(__name__)

HEALTH_TIMEOUT_S = 5.0


class NodeCallError(Exception):
    """A node failed in a way that justifies trying another one (network, timeout, 5xx)."""

    def __init__(self, node_id: str, reason: str) -> None:
        super().__init__(f"node {node_id}: {reason}")
        self.node_id = node_id
        self.reason = reason


@dataclass
class NodeState:
    """What the router knows about one node right now (mutated only on the event loop)."""

    node_id: str
    url: str
    specialisations: list[str] = field(default_factory=list)
    healthy: bool = False
    consecutive_failures: int = 0
    in_flight: int = 0
    ewma_latency_s: float | None = None
    remaining_epsilon: float | None = None
    model_version: str | None = None
    last_error: str | None = None
    configured_specialisations: bool = False
    configured_hospital_id: str | None = None
    hospital_id: str | None = None
    max_prompt_chars: int | None = None
    max_tokens: int | None = None
    consensus_floor: float | None = None

    def summary(self) -> dict[str, Any]:
        """The node as GET /v1/health reports it."""
        return {
            "node_id": self.node_id,
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "ewma_latency_ms": (
                None if self.ewma_latency_s is None else round(self.ewma_latency_s * 1000, 3)
            ),
            "remaining_epsilon": self.remaining_epsilon,
            "model_version": self.model_version,
            "hospital_id": self.hospital_id,
            "specialisations": self.specialisations,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
        }


def node_ssl_context(tls: NodeTLSConfig | None) -> ssl.SSLContext | None:
    """Verification for node certificates (a private CA) and the router's client certificate;
    None means the system's default verification for https:// nodes."""
    if tls is None:
        return None
    context = (
        ssl.create_default_context(cafile=tls.ca_file)
        if tls.ca_file
        else ssl.create_default_context()
    )
    if tls.client_cert_file and tls.client_key_file:
        context.load_cert_chain(tls.client_cert_file, tls.client_key_file)
    return context


def _check_identity(node: NodeState, health: dict[str, Any]) -> None:
    """Refuse a node that answers as another node or for another hospital than configured.

    A mis-pointed URL would otherwise route answers (and consensus charges) to the wrong
    hospital under the configured name.
    """
    reported = health.get("node_id")
    if reported != node.node_id:
        raise ValueError(f"answers as node {reported!r}, configured as {node.node_id!r}")
    hospital = health.get("hospital_id")
    if not isinstance(hospital, str) or not hospital:
        raise ValueError("health names no hospital_id")
    if node.configured_hospital_id is not None and hospital != node.configured_hospital_id:
        raise ValueError(
            f"answers for hospital {hospital!r}, configured for {node.configured_hospital_id!r}"
        )
    node.hospital_id = hospital


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _read_capabilities(node: NodeState, health: dict[str, Any]) -> None:
    """The node's request limits and consensus floor, so the router refuses early."""
    limits = health.get("limits") if isinstance(health.get("limits"), dict) else {}
    node.max_prompt_chars = _positive_int(limits.get("max_prompt_chars"))
    node.max_tokens = _positive_int(limits.get("max_tokens"))
    consensus = health.get("consensus")
    floor = consensus.get("min_noise_multiplier") if isinstance(consensus, dict) else None
    node.consensus_floor = (
        float(floor)
        if isinstance(floor, int | float) and not isinstance(floor, bool) and floor > 0
        else None
    )


class NodePool:
    """The set of nodes, one shared HTTP client, and the health-probing task."""

    def __init__(
        self,
        nodes: list[NodeConfig],
        routing: RoutingConfig,
        *,
        tls: NodeTLSConfig | None = None,
        limits: LimitsConfig | None = None,
        on_health: Callable[[NodeState], None] | None = None,
        tracing: Tracing = DISABLED,
    ) -> None:
        self._routing = routing
        self.tracing = tracing
        self._tls = tls
        self._limits = limits or LimitsConfig()
        self._on_health = on_health
        self._nodes: dict[str, NodeState] = {}
        self._client: NodeClient | None = None
        self._task: asyncio.Task[None] | None = None
        for node in nodes:
            self._register(node)

    def _register(self, node: NodeConfig) -> NodeState:
        state = NodeState(
            node_id=node.node_id,
            url=node.url.rstrip("/"),
            specialisations=list(node.specialisations),
            configured_specialisations=bool(node.specialisations),
            configured_hospital_id=node.hospital_id,
            hospital_id=node.hospital_id,
        )
        self._nodes[node.node_id] = state
        return state

    @property
    def nodes(self) -> list[NodeState]:
        """Every node in registration order (policies keep this order on ties)."""
        return list(self._nodes.values())

    def get(self, node_id: str) -> NodeState | None:
        """The node called ``node_id``, if registered."""
        return self._nodes.get(node_id)

    @property
    def client(self) -> NodeClient:
        """The pooled client (only valid between start and stop)."""
        if self._client is None:
            raise RuntimeError("node pool is not started")
        return self._client

    async def start(self) -> None:
        """Open the client, probe every node once, then keep probing in the background."""
        self._client = NodeClient(
            ssl_context=node_ssl_context(self._tls),
            timeout_s=self._routing.timeout_s,
            connect_timeout_s=min(5.0, self._routing.timeout_s),
            max_connections=self._limits.max_connections,
            max_idle_connections=self._limits.max_keepalive_connections,
        )
        await self.probe_all()
        self._task = asyncio.create_task(self._probe_forever(), name="fedllm-router-health")

    async def stop(self) -> None:
        """Stop probing and close every connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def add_node(self, node: NodeConfig) -> NodeState:
        """Register (or replace) a node at runtime and probe it right away."""
        state = self._register(node)
        if self._client is not None:
            await self.probe(state)
        return state

    def remove_node(self, node_id: str) -> NodeState | None:
        """Take a node out for good (admin API); requests already sent to it finish."""
        return self._nodes.pop(node_id, None)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._routing.health_interval_s)
            try:
                await self.probe_all()
            except Exception as error:  # a bug here must not stop health checking for good
                log.error("health_probe_error", error_type=type(error).__name__)

    async def probe_all(self) -> None:
        """Probe every node concurrently."""
        await asyncio.gather(*(self.probe(node) for node in self.nodes))

    async def probe(self, node: NodeState) -> None:
        """GET /v1/health: healthy again on success, one more failure otherwise."""
        try:
            response = await self.client.request(
                "GET", node.url, "/v1/health", timeout_s=HEALTH_TIMEOUT_S
            )
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            health = response.json()
            if not isinstance(health, dict):
                raise ValueError("health answer is not a JSON object")
            _check_identity(node, health)
        except (NodeTransportError, ValueError) as error:
            self.record_failure(node, f"health probe: {error}", hard=True)
            return
        _read_capabilities(node, health)
        remaining = health.get("remaining_epsilon")
        node.remaining_epsilon = (
            float(remaining)
            if isinstance(remaining, int | float) and not isinstance(remaining, bool)
            else None
        )
        node.model_version = str(health.get("model_version") or "") or None
        if not node.configured_specialisations:
            node.specialisations = list(health.get("specialisations") or [])
        if health.get("status", "ok") == "ok":
            self.record_success(node, None)
        else:
            self.record_failure(node, f"status {health.get('status')}", hard=True)

    def record_success(self, node: NodeState, latency_s: float | None) -> None:
        """A good answer: reset failures, fold latency into the EWMA, back in rotation."""
        was_healthy = node.healthy
        node.consecutive_failures = 0
        node.last_error = None
        node.healthy = True
        if latency_s is not None:
            alpha = self._routing.ewma_alpha
            previous = node.ewma_latency_s
            node.ewma_latency_s = (
                latency_s if previous is None else alpha * latency_s + (1 - alpha) * previous
            )
        if not was_healthy:
            log.info("node_healthy", node_id=node.node_id)
            self._notify(node)

    def record_failure(self, node: NodeState, reason: str, *, hard: bool) -> None:
        """A failure; ``hard`` (refused connection, failed probe) takes the node out at once."""
        node.consecutive_failures += 1
        node.last_error = reason
        limit = self._routing.unhealthy_after_failures
        if node.healthy and (hard or node.consecutive_failures >= limit):
            node.healthy = False
            log.warning("node_unhealthy", node_id=node.node_id, reason=reason)
            self._notify(node)

    def _notify(self, node: NodeState) -> None:
        if self._on_health is not None:
            self._on_health(node)

    async def call(
        self, node: NodeState, path: str, payload: dict[str, Any], *, timeout_s: float | None = None
    ) -> NodeResponse:
        """POST ``payload`` to ``node``; NodeCallError on anything worth failing over.

        4xx answers are returned, not raised: they are the caller's mistake (or a node's
        refusal, e.g. 409 budget exhausted), and another node would say the same.
        """
        started = time.perf_counter()
        attributes = {"fedllm.node_id": node.node_id, "http.route": path}
        with self.tracing.span("router.node_call", attributes, kind=SpanKind.CLIENT) as span:
            response = await self._post(node, path, payload, timeout_s)
            span.set_attribute("http.response.status_code", response.status_code)
        self.record_success(node, time.perf_counter() - started)
        return response

    async def _post(
        self, node: NodeState, path: str, payload: dict[str, Any], timeout_s: float | None
    ) -> NodeResponse:
        """The HTTP exchange of `call`, with its failures booked against the node."""
        node.in_flight += 1
        try:
            response = await self.client.request(
                "POST", node.url, path, payload, timeout_s=timeout_s
            )
        except NodeConnectError as error:
            self.record_failure(node, str(error), hard=True)
            raise NodeCallError(node.node_id, "connection failed") from None
        except NodeTimeoutError:
            self.record_failure(node, "timeout", hard=False)
            raise NodeCallError(node.node_id, "timed out") from None
        except NodeTransportError as error:
            self.record_failure(node, str(error), hard=False)
            raise NodeCallError(node.node_id, "transport error") from None
        finally:
            node.in_flight -= 1
        if response.status_code >= 500:
            self.record_failure(node, f"HTTP {response.status_code}", hard=False)
            raise NodeCallError(node.node_id, f"HTTP {response.status_code}")
        return response
