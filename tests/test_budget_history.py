"""Budget history, admin budget reports and unusual-consumption alerts, through a real router."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from router_helpers import (
    CONSENSUS_TOKENS,
    PASSWORD,
    bearer,
    consensus_cost,
    login,
    make_credentials,
    node_app,
    router_config,
    start_router,
)

from fedllm.security.audit import verify_audit_log
from fedllm.security.users import Role
from fedllm.serving.node.server import BackgroundServer
from fedllm.serving.router.budgets import BudgetLedger

CONSENSUS = {"prompt": "q", "max_tokens": CONSENSUS_TOKENS, "require_consensus": True}
ALERTS = {
    "interval_s": 0.2,
    "spending_min_epsilon": 0.0,
    "spending_factor": 2.0,
    "refused_threshold": 3,
    "auth_failures_threshold": 3,
}


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    """One router over two nodes; ann and bob (icu), cat (ward), admin root; ann's quota fits
    two answers, so her third is refused."""
    directory = tmp_path_factory.mktemp("history")
    creds = make_credentials(
        directory,
        {
            "ann": (Role.CLINICIAN, "icu"),
            "bob": (Role.CLINICIAN, "icu"),
            "cat": (Role.CLINICIAN, "ward"),
            "root": (Role.ADMIN, "it"),
        },
    )
    two_answers = 2 * consensus_cost() + 1e-5
    with (
        BackgroundServer(node_app(directory, "node-a")) as node_a,
        BackgroundServer(node_app(directory, "node-b")) as node_b,
    ):
        config = router_config(
            creds,
            [("node-a", node_a.url), ("node-b", node_b.url)],
            budgets={"quota_overrides": {"ann": two_answers}},
            alerts=ALERTS,
        )
        server = start_router(config, creds)
        try:
            with httpx.Client(base_url=server.url, verify=creds.client_ssl, timeout=60) as client:
                tokens = {name: login(client, name) for name in ("ann", "bob", "cat", "root")}
                for name, count in (("ann", 3), ("bob", 1), ("cat", 1)):
                    for _ in range(count):
                        client.post("/v1/inference", json=CONSENSUS, headers=bearer(tokens[name]))
                yield {"client": client, "tokens": tokens, "creds": creds, "config": config}
        finally:
            server.stop()


def _get(router, path: str, user: str, **params) -> httpx.Response:
    return router["client"].get(path, params=params, headers=bearer(router["tokens"][user]))


def test_history_lists_every_charge_with_mechanism_and_request_id(router):
    reply = _get(router, "/v1/privacy/budget/ann/history", "ann")
    assert reply.status_code == 200, reply.text
    events = reply.json()["events"]
    assert [event["kind"] for event in events] == ["charge", "charge"]
    assert all(event["epsilon"] == pytest.approx(consensus_cost(), abs=1e-6) for event in events)
    assert {event["mechanism"] for event in events} == {"gnmax-consensus"}
    audit = [json.loads(line) for line in (router["creds"].directory / "audit.jsonl").open()]
    charged = {e["fields"]["reservation"] for e in audit if e["event"] == "consensus_charge"}
    assert {event["request_id"] for event in events} <= charged
    assert datetime.fromisoformat(events[0]["time"]) > datetime.now(UTC) - timedelta(minutes=5)


def test_history_pages_with_a_cursor(router):
    first = _get(router, "/v1/privacy/budget/ann/history", "ann", limit=1).json()
    assert len(first["events"]) == 1
    assert first["next_cursor"] is not None
    second = _get(
        router, "/v1/privacy/budget/ann/history", "ann", limit=1, cursor=first["next_cursor"]
    ).json()
    assert len(second["events"]) == 1
    assert second["next_cursor"] is None
    assert first["events"][0]["request_id"] != second["events"][0]["request_id"]
    bad = _get(router, "/v1/privacy/budget/ann/history", "ann", limit=0)
    assert bad.status_code == 422
    assert "limit must be an integer from 1 to 500" in bad.json()["detail"]


def test_history_refund_is_listed(tmp_path):
    """A refund (no hospital voted) appears with its request id, next to no charge."""
    ledger = BudgetLedger(
        f"sqlite:///{tmp_path / 'b.db'}", user_quota=1.0, department_quota=10.0, period_s=3600
    )
    kept, released = ledger.reserve("dan", "icu", 0.25), ledger.reserve("dan", "icu", 0.5)
    ledger.commit(kept)
    ledger.refund(released)
    ledger.refund(released)  # repeated: no second history entry
    events, cursor = ledger.history("dan")
    assert [(e.kind, e.epsilon, e.request_id) for e in events] == [
        ("refund", 0.5, released.id),
        ("charge", 0.25, kept.id),
    ]
    assert cursor is None


def test_history_is_own_or_admin(router):
    denied = _get(router, "/v1/privacy/budget/ann/history", "bob")
    assert denied.status_code == 403
    assert _get(router, "/v1/privacy/budget/ann/history", "root").status_code == 200


def test_admin_lists_users_above_a_fraction_of_their_quota(router):
    reply = _get(router, "/v1/admin/budget/users", "root", above=0.8)
    assert reply.status_code == 200, reply.text
    users = reply.json()["users"]
    assert [user["user_id"] for user in users] == ["ann"]
    assert users[0]["fraction"] > 0.99
    everyone = _get(router, "/v1/admin/budget/users", "root", above=0).json()["users"]
    assert {user["user_id"] for user in everyone} == {"ann", "bob", "cat"}
    assert _get(router, "/v1/admin/budget/users", "ann").status_code == 403
    assert _get(router, "/v1/admin/budget/users", "root", above=-1).status_code == 422


def test_admin_department_usage_over_a_period(router):
    cost = consensus_cost()
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    reply = _get(router, "/v1/admin/budget/departments", "root", since=since)
    assert reply.status_code == 200, reply.text
    departments = {d["department"]: d for d in reply.json()["departments"]}
    assert departments["icu"]["charged"] == pytest.approx(3 * cost, abs=1e-5)
    assert departments["icu"]["charges"] == 3
    assert departments["icu"]["users"] == 2
    assert departments["ward"]["charges"] == 1
    past = _get(
        router,
        "/v1/admin/budget/departments",
        "root",
        since="2020-01-01T00:00:00Z",
        until="2020-02-01T00:00:00Z",
    ).json()
    assert past["departments"] == []
    bad = _get(router, "/v1/admin/budget/departments", "root", since="yesterday")
    assert bad.status_code == 422
    assert "since must be an ISO 8601 time" in bad.json()["detail"]


def _metric(router, name: str) -> float:
    text = router["client"].get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def _wait_for(router, name: str, value: float) -> None:
    deadline = time.monotonic() + 10
    while _metric(router, name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.1)


def test_unusual_spending_raises_a_gauge_and_an_audit_entry(router):
    # Everyone spent today and nobody before: above 2x a zero average, min 0 ε.
    _wait_for(router, "fedllm_router_alert_unusual_spending_users", 3.0)
    assert _metric(router, "fedllm_router_alert_unusual_spending") == 1.0
    audit = router["creds"].directory / "audit.jsonl"
    raised = [
        json.loads(line)["fields"]
        for line in audit.open()
        if json.loads(line)["event"] == "alert_raised"
    ]
    flagged = {f["user"] for f in raised if f["condition"] == "unusual_spending"}
    assert flagged == {"ann", "bob", "cat"}


def test_refused_burst_and_auth_failures_raise_alerts(router):
    client, ann = router["client"], router["tokens"]["ann"]
    for _ in range(4):  # ann's quota is spent: each is a 403
        assert client.post("/v1/inference", json=CONSENSUS, headers=bearer(ann)).status_code == 403
    _wait_for(router, "fedllm_router_alert_refused_burst", 1.0)
    for _ in range(4):
        bad = client.post("/v1/auth/token", json={"username": "cat", "password": PASSWORD + "x"})
        assert bad.status_code in (401, 423)
    _wait_for(router, "fedllm_router_alert_auth_failures", 1.0)
    audit = router["creds"].directory / "audit.jsonl"
    conditions = [
        json.loads(line)["fields"]["condition"]
        for line in audit.open()
        if json.loads(line)["event"] == "alert_raised"
    ]
    assert "refused_burst" in conditions
    assert "auth_failures" in conditions
    key = router["creds"].consortium.audit_key.read_bytes().strip()
    assert verify_audit_log(audit, key).ok


def test_shipped_alert_rules_use_metrics_the_router_exports(router):
    rules = yaml.safe_load(Path("deploy/prometheus/alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    referenced = {name for expr in exprs for name in re.findall(r"fedllm_router_\w+", expr)}
    assert {
        "fedllm_router_alert_unusual_spending",
        "fedllm_router_alert_refused_burst",
        "fedllm_router_alert_auth_failures",
    } <= referenced
    exported = router["client"].get("/metrics").text
    for name in referenced:
        assert re.search(rf"^{name}(\{{| )", exported, re.MULTILINE), name
