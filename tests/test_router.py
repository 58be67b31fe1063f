"""The router end to end: real TLS router, real hospital nodes, real ledgers, real clients."""

from __future__ import annotations

import base64
import json
import re
import time

import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from router_helpers import (
    CONSENSUS_TOKENS,
    PASSWORD,
    bearer,
    consensus_cost,
    login,
    make_credentials,
    node_app,
    node_ledger,
    router_config,
    start_router,
)

from fedllm.security.audit import verify_audit_log
from fedllm.security.tokens import TokenIssuer
from fedllm.security.users import Role, User
from fedllm.serving.node.backends import ConstantBackend
from fedllm.serving.node.server import BackgroundServer
from fedllm.serving.router.budgets import BudgetLedger

USERS = {
    "alice": (Role.CLINICIAN, "cardiology"),
    "bob": (Role.CLINICIAN, "oncology"),
    "root": (Role.ADMIN, "it"),
    "carol": (Role.RESEARCHER, "genomics"),
}
HMAC_GUESS = "a-guessed-secret-of-at-least-32-bytes!"
REPLY_WORDS = ConstantBackend().text.split()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("router")
    creds = make_credentials(directory, USERS)
    with (
        BackgroundServer(node_app(directory, "node-a")) as node_a,
        BackgroundServer(node_app(directory, "node-b")) as node_b,
    ):
        config = router_config(creds, [("node-a", node_a.url), ("node-b", node_b.url)])
        router = start_router(config, creds)
        client = httpx.Client(base_url=router.url, verify=creds.client_ssl, timeout=30)
        try:
            yield {"creds": creds, "router": router, "client": client, "directory": directory}
        finally:
            client.close()
            router.stop()


def test_token_then_plain_inference_costs_nothing(cluster):
    client = cluster["client"]
    token = login(client, "alice")
    response = client.post(
        "/v1/inference",
        json={"prompt": "chest pain, next step?", "max_tokens": 4},
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["response"] == " ".join(REPLY_WORDS[:4])
    assert body["privacy_cost"] == 0.0
    assert body["node_id"] in {"node-a", "node-b"}
    assert body["remaining_budget"] == pytest.approx(100.0)
    assert "0 ε" in body["privacy_note"]
    assert body["consensus_reached"] is None
    # A 0-ε answer reserves nothing.
    budget = client.get("/v1/privacy/budget/alice", headers=bearer(token)).json()
    assert budget["spent"] == 0.0
    assert budget["reserved"] == 0.0


def test_form_login_and_wrong_password(cluster):
    client = cluster["client"]
    ok = client.post("/v1/auth/token", data={"username": "bob", "password": PASSWORD})
    assert ok.status_code == 200
    assert ok.json()["token_type"] == "bearer"
    assert ok.json()["expires_in"] == 900
    bad = client.post("/v1/auth/token", json={"username": "bob", "password": "nope"})
    assert bad.status_code == 401
    assert bad.json() == {"detail": "invalid username or password"}
    unknown = client.post("/v1/auth/token", json={"username": "mallory", "password": "nope"})
    assert unknown.status_code == 401
    assert unknown.json() == bad.json()


def test_consensus_charges_user_and_every_hospital(cluster):
    client, directory = cluster["client"], cluster["directory"]
    token = login(client, "bob")
    spent_before = {n: node_ledger(directory, n).spent_epsilon() for n in ("node-a", "node-b")}
    cost = consensus_cost()
    response = client.post(
        "/v1/inference",
        json={
            "prompt": "confidential: patient X has condition Y",
            "max_tokens": CONSENSUS_TOKENS,
            "require_consensus": True,
            "privacy_budget": cost * 2,
            "department": "cardiology",  # a routing hint only: bob's quota is oncology's
        },
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["privacy_cost"] == pytest.approx(cost)
    assert body["remaining_budget"] == pytest.approx(100.0 - cost, abs=1e-6)
    assert sorted(body["node_id"].split(",")) == ["node-a", "node-b"]
    assert isinstance(body["consensus_reached"], bool)
    assert 0.0 <= body["confidence_score"] <= 1.0
    assert re.fullmatch(r"(t\d+ ?){0,2}", body["response"])
    budget = client.get("/v1/privacy/budget/bob", headers=bearer(token)).json()
    assert budget["spent"] == pytest.approx(cost, abs=1e-6)
    assert budget["department"] == "oncology"
    assert budget["department_remaining"] == pytest.approx(1000.0 - cost, abs=1e-6)
    cardiology = client.get("/v1/privacy/budget/alice", headers=bearer(login(client, "alice")))
    assert cardiology.json()["department_remaining"] == pytest.approx(1000.0)
    assert budget["reserved"] == 0.0
    for node_id in ("node-a", "node-b"):
        assert node_ledger(directory, node_id).spent_epsilon() > spent_before[node_id]
    # The audit log records the charge, never the prompt, and its chain verifies.
    audit_path = directory / "audit.jsonl"
    text = audit_path.read_text()
    assert "confidential" not in text
    entries = [json.loads(line) for line in text.splitlines()]
    charge = [e for e in entries if e["event"] == "consensus_charge"][-1]
    assert charge["fields"]["user"] == "bob"
    assert charge["fields"]["prompt"].startswith("hmac-sha256:")
    assert verify_audit_log(
        audit_path, cluster["creds"].consortium.audit_key.read_bytes().strip()
    ).ok


def test_consensus_over_privacy_budget_is_refused_without_charge(cluster):
    client = cluster["client"]
    token = login(client, "alice")
    cost = consensus_cost()
    response = client.post(
        "/v1/inference",
        json={
            "prompt": "q",
            "max_tokens": CONSENSUS_TOKENS,
            "require_consensus": True,
            "privacy_budget": cost / 2,
        },
        headers=bearer(token),
    )
    assert response.status_code == 400
    assert f"{cost:.6g}" in response.json()["detail"]
    budget = client.get("/v1/privacy/budget/alice", headers=bearer(token)).json()
    assert budget["spent"] == 0.0
    assert budget["reserved"] == 0.0


def _token(claims_override: dict, *, key=None, algorithm="EdDSA", headers=None) -> str:
    now = int(time.time())
    claims = {
        "sub": "alice",
        "role": "admin",
        "dept": "cardiology",
        "iss": "fedllm-router",
        "aud": "fedllm",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "x",
    }
    claims.update(claims_override)
    key = key if key is not None else ed25519.Ed25519PrivateKey.generate()
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def _unsigned_token() -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "sub": "root",
        "role": "admin",
        "dept": "it",
        "iss": "fedllm-router",
        "aud": "fedllm",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def test_bad_tokens_are_refused(cluster):
    client, creds = cluster["client"], cluster["creds"]
    signing_pem = creds.consortium.jwt_private_key.read_bytes()
    router_key = serialization.load_pem_private_key(signing_pem, None)
    real = TokenIssuer(signing_pem, issuer="fedllm-router", audience="fedllm")
    user = User("alice", Role.CLINICIAN, "cardiology")
    expired = TokenIssuer(
        signing_pem,
        issuer="fedllm-router",
        audience="fedllm",
        clock=lambda: time.time() - 3600,
    ).issue(user)
    wrong_audience = TokenIssuer(
        signing_pem,
        issuer="fedllm-router",
        audience="other-service",
    ).issue(user)
    cases = {
        "forged": (_token({}), "bad signature"),
        "expired": (expired, "expired"),
        "wrong audience": (wrong_audience, "wrong audience"),
        "HS256 with public key": (
            jwt.encode(
                {"sub": "root", "iss": "fedllm-router"},
                "a-guessed-secret-of-at-least-32-bytes!",
                algorithm="HS256",
            ),
            "algorithm not allowed",
        ),
        "ES256 key": (
            _token({}, key=ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
            "algorithm not allowed",
        ),
        "alg none": (_unsigned_token(), None),
        "garbage": ("not-a-jwt", None),
    }
    for name, (token, reason) in cases.items():
        response = client.post("/v1/inference", json={"prompt": "hi"}, headers=bearer(token))
        assert response.status_code == 401, name
        assert response.headers["www-authenticate"] == "Bearer"
        if reason is not None:
            assert reason in response.json()["detail"], name
    assert client.post("/v1/inference", json={"prompt": "hi"}).status_code == 401
    # Control: the same key and claims, properly signed, pass.
    good = jwt.encode(
        {**jwt.decode(real.issue(user), options={"verify_signature": False})},
        router_key,
        algorithm="EdDSA",
    )
    assert (
        client.post("/v1/inference", json={"prompt": "hi"}, headers=bearer(good)).status_code == 200
    )


def test_roles_guard_admin_endpoints_and_budgets(cluster):
    client = cluster["client"]
    alice, root = login(client, "alice"), login(client, "root")
    assert client.get("/v1/privacy/budget/bob", headers=bearer(alice)).status_code == 403
    assert client.get("/v1/privacy/budget/bob", headers=bearer(root)).status_code == 200
    assert client.get("/v1/privacy/budget/nobody", headers=bearer(root)).status_code == 404
    node = {"node_id": "node-x", "url": "http://127.0.0.1:9"}
    assert client.post("/v1/admin/nodes", json=node, headers=bearer(alice)).status_code == 403
    change = {"routing_policy": "latency"}
    assert client.put("/v1/admin/config", json=change, headers=bearer(alice)).status_code == 403
    applied = client.put(
        "/v1/admin/config",
        json={"routing_policy": "least-busy", "department_quotas": {"genomics": 50.0}},
        headers=bearer(root),
    )
    assert applied.status_code == 200, applied.text
    assert applied.json()["applied"]["routing_policy"] == "least-busy"
    bad = client.put("/v1/admin/config", json={"routing_policy": "random"}, headers=bearer(root))
    assert bad.status_code == 422


def test_cache_is_per_user(cluster):
    client = cluster["client"]
    alice, bob = login(client, "alice"), login(client, "bob")
    request = {"prompt": "cache me", "max_tokens": 3, "temperature": 0.0}
    first = client.post("/v1/inference", json=request, headers=bearer(alice))
    second = client.post("/v1/inference", json=request, headers=bearer(alice))
    other = client.post("/v1/inference", json=request, headers=bearer(bob))
    sampled = client.post(
        "/v1/inference", json={**request, "temperature": 0.7}, headers=bearer(alice)
    )
    assert [r.headers["x-cache"] for r in (first, second, other, sampled)] == [
        "miss",
        "hit",
        "miss",
        "miss",
    ]
    assert second.json()["response"] == first.json()["response"]


def test_node_refusal_is_passed_back_without_failover(cluster):
    """A 4xx from a node (here: max_tokens over the node's own limit) is the caller's problem:
    it comes back as is, and no node is marked as failing."""
    client = cluster["client"]
    token = login(client, "alice")
    response = client.post(
        "/v1/inference", json={"prompt": "long", "max_tokens": 2000}, headers=bearer(token)
    )
    assert 400 <= response.status_code < 500
    assert "max_tokens" in response.text
    health = client.get("/v1/health").json()
    assert all(node["consecutive_failures"] == 0 for node in health["nodes"])
    assert "fedllm_router_node_failures_total{" not in client.get("/metrics").text


def test_bad_input_is_422_not_500(cluster):
    client = cluster["client"]
    token = login(client, "alice")
    bad_bodies = [
        {},
        {"prompt": ""},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "temperature": 5},
        {"prompt": "bell \x07 char"},
        {"prompt": "x", "privacy_budget": -1},
        {"prompt": "x", "unexpected": 1},
        {"prompt": 12},
    ]
    for body in bad_bodies:
        response = client.post("/v1/inference", json=body, headers=bearer(token))
        assert response.status_code == 422, body
        assert "bell" not in response.text  # prompts are never echoed back
    raw = client.post(
        "/v1/inference",
        content=b"{not json",
        headers={**bearer(token), "content-type": "application/json"},
    )
    assert raw.status_code == 422
    assert client.post("/v1/auth/token", json={"username": "alice"}).status_code == 422
    assert client.post("/v1/auth/token", content=b"\xff\xfe").status_code == 422
    huge = client.post("/v1/inference", json={"prompt": "x" * 300_000}, headers=bearer(token))
    assert huge.status_code == 413
    assert client.get("/v1/privacy/budget/alice").status_code == 401


def test_lockout_after_repeated_failures(cluster):
    client = cluster["client"]
    statuses = [
        client.post("/v1/auth/token", json={"username": "carol", "password": "wrong"}).status_code
        for _ in range(3)
    ]
    assert statuses == [401, 401, 423]
    locked = client.post("/v1/auth/token", json={"username": "carol", "password": PASSWORD})
    assert locked.status_code == 423
    assert int(locked.headers["retry-after"]) > 0


def test_openai_client_through_router(cluster):
    client, creds = cluster["client"], cluster["creds"]
    token = login(client, "alice")
    with httpx.Client(verify=creds.client_ssl) as http:
        ai = openai.OpenAI(base_url=f"{cluster['router'].url}/v1", api_key=token, http_client=http)
        raw = ai.chat.completions.with_raw_response.create(
            model="fedllm",
            messages=[{"role": "user", "content": "Summarise the discharge note."}],
            max_tokens=5,
            temperature=0,
        )
        completion = raw.parse()
        assert completion.choices[0].message.content == " ".join(REPLY_WORDS[:5])
        assert raw.headers["x-privacy-cost"] == "0"
        assert "post-processing" in raw.headers["x-privacy-note"]
        text = ai.completions.create(model="fedllm", prompt="Hello", max_tokens=2)
        assert text.choices[0].text == " ".join(REPLY_WORDS[:2])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"{cluster['router'].url}/v1", api_key="bogus", http_client=http
            ).completions.create(model="fedllm", prompt="Hello")


def test_metrics_and_health(cluster):
    client = cluster["client"]
    token = login(client, "alice")
    client.post("/v1/inference", json={"prompt": "m", "max_tokens": 1}, headers=bearer(token))
    client.post("/v1/inference", json={"prompt": "m"}, headers=bearer("bad"))
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert re.search(
        r'fedllm_router_requests_total\{endpoint="/v1/inference",status="200"\} [1-9]', text
    )
    assert re.search(r'fedllm_router_auth_failures_total\{reason="malformed"\} [1-9]', text)
    assert "fedllm_router_request_seconds_bucket" in text
    assert re.search(r'fedllm_router_node_healthy\{node_id="node-a"\} 1\.0', text)
    assert "fedllm_router_cache_hits_total" in text
    health = client.get("/v1/health").json()
    assert health["status"] == "ok"
    assert health["nodes_healthy"] == 2
    assert {n["node_id"] for n in health["nodes"]} == {"node-a", "node-b"}
    assert all(n["remaining_epsilon"] is not None for n in health["nodes"])


def test_budget_ledger_agrees_with_router(cluster):
    """The router's view is the ledger's: read the same DB directly."""
    ledger = BudgetLedger(
        cluster["creds"].database,
        user_quota=100.0,
        department_quota=1000.0,
        period_s=30 * 24 * 3600.0,
    )
    status = ledger.status("bob", "oncology")
    assert status.spent >= consensus_cost() - 1e-6
    assert status.reserved == 0.0
