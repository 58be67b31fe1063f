"""Router budgets under load and across restarts: atomic quotas, refunds, persistence."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from router_helpers import (
    CONSENSUS_TOKENS,
    bearer,
    consensus_cost,
    login,
    make_credentials,
    node_app,
    router_config,
    start_router,
)

from fedllm.security.users import Role
from fedllm.serving.node.server import BackgroundServer
from fedllm.serving.router.budgets import BudgetLedger

QUOTA_STATUS = 403  # documented in docs/router.md: quota exhausted is 403, not 429 (rate limits)


def _consensus(prompt: str = "q") -> dict:
    return {"prompt": prompt, "max_tokens": CONSENSUS_TOKENS, "require_consensus": True}


def test_concurrent_consensus_never_overspends(tmp_path):
    cost = consensus_cost()
    quota = math.ceil(cost * 1e6) * 10 / 1e6  # exactly ten answers, in the ledger's micro-ε
    creds = make_credentials(tmp_path, {"dave": (Role.CLINICIAN, "icu")})
    with (
        BackgroundServer(node_app(tmp_path, "node-a")) as node_a,
        BackgroundServer(node_app(tmp_path, "node-b")) as node_b,
    ):
        config = router_config(
            creds,
            [("node-a", node_a.url), ("node-b", node_b.url)],
            budgets={"user_quota": quota},
        )
        router = start_router(config, creds)
        try:
            with httpx.Client(base_url=router.url, verify=creds.client_ssl) as client:
                token = login(client, "dave")

            async def burst() -> list[httpx.Response]:
                limits = httpx.Limits(max_connections=200)
                async with httpx.AsyncClient(
                    base_url=router.url, verify=creds.client_ssl, timeout=120, limits=limits
                ) as client:
                    return await asyncio.gather(
                        *(
                            client.post("/v1/inference", json=_consensus(), headers=bearer(token))
                            for _ in range(200)
                        )
                    )

            responses = asyncio.run(burst())
        finally:
            router.stop()
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 10, sorted(set(statuses))
    assert statuses.count(QUOTA_STATUS) == 190
    refused = next(r for r in responses if r.status_code == QUOTA_STATUS)
    assert "privacy quota exceeded" in refused.json()["detail"]
    ledger = BudgetLedger(
        creds.database, user_quota=quota, department_quota=1000, period_s=config.budgets.period_s
    )
    status = ledger.status("dave", "icu")
    assert status.spent == pytest.approx(quota, abs=1e-9)
    assert status.reserved == 0.0
    assert status.remaining == 0.0


def test_budgets_survive_router_restart(tmp_path):
    creds = make_credentials(tmp_path, {"erin": (Role.CLINICIAN, "icu")})
    cost = consensus_cost()
    with (
        BackgroundServer(node_app(tmp_path, "node-a")) as node_a,
        BackgroundServer(node_app(tmp_path, "node-b")) as node_b,
    ):
        config = router_config(creds, [("node-a", node_a.url), ("node-b", node_b.url)])
        first = start_router(config, creds)
        with httpx.Client(base_url=first.url, verify=creds.client_ssl) as client:
            token = login(client, "erin")
            answer = client.post("/v1/inference", json=_consensus(), headers=bearer(token))
            assert answer.status_code == 200, answer.text
        first.stop()
        second = start_router(config, creds)  # same database, same audit log
        try:
            with httpx.Client(base_url=second.url, verify=creds.client_ssl) as client:
                # The first router's tokens stay valid: same signing key.
                budget = client.get("/v1/privacy/budget/erin", headers=bearer(token))
                assert budget.status_code == 200
                assert budget.json()["spent"] == pytest.approx(cost, abs=1e-6)
                assert budget.json()["remaining"] == pytest.approx(100.0 - cost, abs=1e-6)
        finally:
            second.stop()
    events = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").open()]
    assert events.count("consensus_charge") == 1


def test_hospital_refusal_refunds_the_user(tmp_path):
    """A hospital at its ε cap answers 409: below min_nodes nothing is voted, so no charge."""
    creds = make_credentials(tmp_path, {"frank": (Role.CLINICIAN, "icu")})
    with (
        BackgroundServer(node_app(tmp_path, "rich")) as rich,
        BackgroundServer(node_app(tmp_path, "poor", cap=1e-6)) as poor,
    ):
        config = router_config(creds, [("rich", rich.url), ("poor", poor.url)])
        router = start_router(config, creds)
        try:
            with httpx.Client(base_url=router.url, verify=creds.client_ssl) as client:
                token = login(client, "frank")
                response = client.post("/v1/inference", json=_consensus(), headers=bearer(token))
                assert response.status_code == 503
                assert "1 hospital privacy budget exhausted" in response.json()["detail"]
                budget = client.get("/v1/privacy/budget/frank", headers=bearer(token)).json()
                assert budget["spent"] == 0.0
                assert budget["reserved"] == 0.0
                plain = client.post("/v1/inference", json={"prompt": "q"}, headers=bearer(token))
                assert plain.status_code == 200
        finally:
            router.stop()
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").open()]
    events = [entry["event"] for entry in entries]
    assert "consensus_refund" in events
    assert "consensus_charge" not in events
    # the hospital that opened its session was charged (no ballot was cast): the audit says so
    refund = next(entry for entry in entries if entry["event"] == "consensus_refund")
    charged = refund["fields"]["charged_ledgers"]
    assert [ledger["hospital_id"] for ledger in charged] == ["hospital-rich"]


def test_quota_changed_by_admin_applies(tmp_path):
    creds = make_credentials(
        tmp_path, {"gina": (Role.CLINICIAN, "icu"), "root": (Role.ADMIN, "it")}
    )
    with (
        BackgroundServer(node_app(tmp_path, "node-a")) as node_a,
        BackgroundServer(node_app(tmp_path, "node-b")) as node_b,
    ):
        config = router_config(creds, [("node-a", node_a.url), ("node-b", node_b.url)])
        router = start_router(config, creds)
        try:
            with httpx.Client(base_url=router.url, verify=creds.client_ssl) as client:
                gina, root = login(client, "gina"), login(client, "root")
                change = client.put(
                    "/v1/admin/config", json={"user_quotas": {"gina": 0.0}}, headers=bearer(root)
                )
                assert change.status_code == 200
                refused = client.post("/v1/inference", json=_consensus(), headers=bearer(gina))
                assert refused.status_code == QUOTA_STATUS
                plain = client.post("/v1/inference", json={"prompt": "q"}, headers=bearer(gina))
                assert plain.status_code == 200
                assert plain.json()["remaining_budget"] == 0.0
        finally:
            router.stop()
