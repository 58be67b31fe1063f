"""Consensus through a real router and real nodes, attacked: one ballot per hospital, every
refusal before anything is charged, node identities checked, every charged ledger audited."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from router_helpers import (
    DELTA,
    bearer,
    login,
    make_credentials,
    node_app,
    router_config,
    start_router,
)

from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.security.users import Role
from fedllm.serving.node.server import BackgroundServer

# The router asks for σ = 20 (noise multiplier 14.1); "strict" requires more.
STRICT_FLOOR = 100.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Nodes a1 and a2 of one hospital (one ledger), b, a strict c, a mislabelled d; two routers.

    The main router needs 2 hospitals; the greedy one needs 4, which the cluster cannot give.
    """
    directory = tmp_path_factory.mktemp("consensus")
    creds = make_credentials(directory, {"ann": (Role.CLINICIAN, "icu")})
    with ExitStack() as stack:
        servers = {
            "a1": stack.enter_context(BackgroundServer(node_app(directory, "a1", hospital="h-a"))),
            "a2": stack.enter_context(BackgroundServer(node_app(directory, "a2", hospital="h-a"))),
            "b": stack.enter_context(BackgroundServer(node_app(directory, "b", hospital="h-b"))),
            "c": stack.enter_context(
                BackgroundServer(node_app(directory, "c", hospital="h-c", floor=STRICT_FLOOR))
            ),
            "d": stack.enter_context(BackgroundServer(node_app(directory, "d", hospital="h-d"))),
        }
        nodes = [
            {"node_id": name, "url": server.url, "hospital_id": hospital}
            for (name, server), hospital in zip(
                servers.items(), ["h-a", "h-a", "h-b", None, "h-z"], strict=True
            )
        ]
        routers = {}
        for name, min_nodes in (("main", 2), ("greedy", 4)):
            config = router_config(
                creds,
                nodes,
                consensus={"vote_noise_std": 20.0, "top_k": 4, "min_nodes": min_nodes},
                audit={
                    "path": str(directory / f"{name}-audit.jsonl"),
                    "redaction_key_file": str(creds.consortium.audit_key),
                },
            )
            routers[name] = start_router(config, creds)
            stack.callback(routers[name].stop)
        clients = {
            name: stack.enter_context(
                httpx.Client(base_url=router.url, verify=creds.client_ssl, timeout=30)
            )
            for name, router in routers.items()
        }
        token = login(clients["main"], "ann")
        yield {"directory": directory, "clients": clients, "token": token}


def _consensus_events(directory: Path) -> dict[str, int]:
    """How many consensus sessions each hospital's ledger was charged for."""
    counts = {}
    for hospital in ("h-a", "h-b", "h-c", "h-d"):
        url = f"sqlite:///{directory / f'{hospital}-ledger.db'}"
        ledger = NodePrivacyLedger(url, hospital, epsilon_cap=1000.0, delta=DELTA)
        counts[hospital] = sum(1 for event in ledger.events() if event.purpose == "consensus")
    return counts


def _audit(directory: Path, router: str) -> list[dict]:
    path = directory / f"{router}-audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _budget(cluster) -> tuple[float, float]:
    body = (
        cluster["clients"]["main"]
        .get("/v1/privacy/budget/ann", headers=bearer(cluster["token"]))
        .json()
    )
    return body["spent"], body["reserved"]


def test_router_checks_node_identity(cluster):
    health = cluster["clients"]["main"].get("/v1/health").json()
    nodes = {node["node_id"]: node for node in health["nodes"]}
    assert not nodes["d"]["healthy"]
    assert "answers for hospital 'h-d', configured for 'h-z'" in nodes["d"]["last_error"]
    assert nodes["c"]["healthy"]
    assert nodes["c"]["hospital_id"] == "h-c"
    assert nodes["a2"]["hospital_id"] == "h-a"


def test_one_ballot_and_one_charge_per_hospital(cluster):
    directory = cluster["directory"]
    before = _consensus_events(directory)
    request = {"prompt": "q", "max_tokens": 2, "require_consensus": True}
    reply = cluster["clients"]["main"].post(
        "/v1/inference", json=request, headers=bearer(cluster["token"])
    )
    assert reply.status_code == 200, reply.text
    participants = reply.json()["node_id"].split(",")
    assert len(participants) == 2
    assert "b" in participants
    assert len({"a1", "a2"} & set(participants)) == 1
    after = _consensus_events(directory)
    assert after["h-a"] == before["h-a"] + 1  # two nodes, one hospital: charged once
    assert after["h-b"] == before["h-b"] + 1
    assert after["h-c"] == before["h-c"]  # its floor is above the router's noise: never asked
    charge = [e for e in _audit(directory, "main") if e["event"] == "consensus_charge"][-1]
    assert sorted(c["hospital_id"] for c in charge["fields"]["charged_ledgers"]) == ["h-a", "h-b"]
    assert all(c["epsilon"] > 0 for c in charge["fields"]["charged_ledgers"])


@pytest.mark.parametrize(
    ("router", "request_body", "status", "message"),
    [
        ("main", {"prompt": "x" * 9000}, 422, "accepts prompts of at most 8000 characters"),
        ("main", {"max_tokens": 300}, 422, "accepts max_tokens of at most 256"),
        ("greedy", {}, 503, "one ballot per hospital"),
        ("greedy", {}, 503, "requires a noise multiplier of at least 100"),
    ],
)
def test_refusals_come_before_any_charge(cluster, router, request_body, status, message):
    directory = cluster["directory"]
    ledgers_before = _consensus_events(directory)
    budget_before = _budget(cluster)
    audit_before = len(_audit(directory, router))
    body = {"prompt": "q", "max_tokens": 2, "require_consensus": True, **request_body}
    reply = cluster["clients"][router].post(
        "/v1/inference", json=body, headers=bearer(cluster["token"])
    )
    assert reply.status_code == status, reply.text
    assert message in reply.json()["detail"]
    assert _consensus_events(directory) == ledgers_before
    assert _budget(cluster) == budget_before
    new_entries = _audit(directory, router)[audit_before:]
    assert not [e for e in new_entries if e["event"].startswith("consensus")]
