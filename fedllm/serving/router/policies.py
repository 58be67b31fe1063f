"""Routing policies: pure functions ordering the healthy nodes for one request.

Each policy returns every healthy node, best first; the router tries them in that order, so
a policy expresses a preference and failover comes for free. Ties keep the pool's order
(node_id), which makes the functions deterministic and easy to test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from fedllm.serving.router.config import RoutingPolicyName


class RoutableNode(Protocol):
    """What a policy may look at (NodeState provides it)."""

    node_id: str
    healthy: bool
    in_flight: int
    ewma_latency_s: float | None
    specialisations: list[str]
    remaining_epsilon: float | None


Policy = Callable[[Sequence[RoutableNode], str | None], list[RoutableNode]]


def _healthy(nodes: Sequence[RoutableNode]) -> list[RoutableNode]:
    return [node for node in nodes if node.healthy]


def least_busy(nodes: Sequence[RoutableNode], department: str | None = None) -> list[RoutableNode]:
    """Fewest requests in flight first: spreads load without needing latency history."""
    return sorted(_healthy(nodes), key=lambda node: node.in_flight)


def lowest_latency(
    nodes: Sequence[RoutableNode], department: str | None = None
) -> list[RoutableNode]:
    """Lowest EWMA latency first; nodes never measured go first so they get measured."""
    return sorted(
        _healthy(nodes),
        key=lambda node: -1.0 if node.ewma_latency_s is None else node.ewma_latency_s,
    )


def specialisation(
    nodes: Sequence[RoutableNode], department: str | None = None
) -> list[RoutableNode]:
    """Nodes specialised in the department first (least busy among them), then the rest."""
    ordered = least_busy(nodes)
    if department is None:
        return ordered
    wanted = department.lower()
    return sorted(ordered, key=lambda node: wanted not in {s.lower() for s in node.specialisations})


def privacy_aware(
    nodes: Sequence[RoutableNode], department: str | None = None
) -> list[RoutableNode]:
    """Most remaining hospital ε first (consensus spends it); unknown ε last."""
    return sorted(
        _healthy(nodes),
        key=lambda node: -math.inf if node.remaining_epsilon is None else node.remaining_epsilon,
        reverse=True,
    )


POLICIES: dict[RoutingPolicyName, Policy] = {
    "least-busy": least_busy,
    "latency": lowest_latency,
    "specialisation": specialisation,
    "privacy-aware": privacy_aware,
}
