"""The router under hostile, slow and sloppy clients, and its admin API's edge cases.

Real processes only: a TLS router (uvicorn on loopback, real SQLite, real audit log) in front of
a ConstantBackend node; raw sockets for what well-behaved HTTP libraries never send.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from raw_http import connect, exchange, read_response, uvicorn_errors
from router_helpers import (
    PASSWORD,
    bearer,
    login,
    make_credentials,
    router_config,
    start_router,
)

from fedllm.config.loading import ConfigError
from fedllm.security.users import Role, UserStore
from fedllm.serving.node.app import create_node_app
from fedllm.serving.node.backends import ConstantBackend
from fedllm.serving.node.config import NodeServerConfig
from fedllm.serving.node.server import BackgroundServer
from fedllm.serving.router import create_router_app
from fedllm.serving.router.config import load_router_config

USERS = {
    "root": (Role.ADMIN, "ops"),
    "dr-grey": (Role.CLINICIAN, "cardiology"),
}
LIMITS = {
    "header_timeout_s": 1.0,
    "body_timeout_s": 1.0,
    "max_header_bytes": 4096,
    "max_incoming_connections": 8,
}


def _node(node_id: str) -> BackgroundServer:
    config = NodeServerConfig(
        node_id=node_id, hospital_id=f"hospital-{node_id}", backend="constant"
    )
    return BackgroundServer(create_node_app(config, ConstantBackend()))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("robust")
    creds = make_credentials(directory, USERS)
    with _node("a") as node_a, _node("b") as node_b:
        config = router_config(creds, [("a", node_a.url)], limits=LIMITS)
        router = start_router(config, creds)
        try:
            with httpx.Client(base_url=router.url, verify=creds.client_ssl, timeout=30) as client:
                tokens = {user: login(client, user) for user in USERS}
                yield {
                    "creds": creds,
                    "router": router,
                    "client": client,
                    "tokens": tokens,
                    "node_b": node_b,
                    "directory": directory,
                }
        finally:
            router.stop()


def _raw(stack, data: bytes) -> object:
    return exchange(stack["router"].url, data, stack["creds"].client_ssl)


def _audit_entries(path: Path, event: str) -> list[dict]:
    """Entries of one event, with their fields (nested under ``fields`` or not) at top level."""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [{**e, **e.get("fields", {})} for e in entries if e["event"] == event]


def _audit(stack, event: str) -> list[dict]:
    return _audit_entries(stack["directory"] / "audit.jsonl", event)


def _metric(stack, endpoint: str, status: str) -> float:
    text = stack["client"].get("/metrics").text
    prefix = f'fedllm_router_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def _assert_router_error(response, status: int, fragment: str) -> None:
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    assert fragment in response.json()["detail"]


# --- 500s with tracebacks ------------------------------------------------------------------------


def test_deeply_nested_login_body_is_422(stack):
    body = b"[" * 5000 + b"]" * 5000
    with uvicorn_errors() as errors:
        response = stack["client"].post(
            "/v1/auth/token", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 422, response.text
    assert "JSON" in response.json()["detail"]
    assert errors == []


def test_client_leaving_mid_body_is_not_a_500(stack):
    before = _metric(stack, "/v1/auth/token", "400")
    with uvicorn_errors() as errors:
        with connect(stack["router"].url, stack["creds"].client_ssl) as sock:
            sock.sendall(
                b"POST /v1/auth/token HTTP/1.1\r\nHost: router\r\nContent-Type: application/json"
                b'\r\nContent-Length: 500\r\n\r\n{"username": '
            )
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while _metric(stack, "/v1/auth/token", "400") == before:
            assert time.monotonic() < deadline, "the disconnect was never answered"
            time.sleep(0.05)
    assert _metric(stack, "/v1/auth/token", "500") == 0
    assert errors == []


def test_huge_admin_quota_is_422(stack):
    client, admin = stack["client"], bearer(stack["tokens"]["root"])
    for quota in (1e13, 1e300):
        response = client.put(
            "/v1/admin/config", json={"user_quotas": {"dr-grey": quota}}, headers=admin
        )
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][-2:] == ["user_quotas", "dr-grey"]


@pytest.mark.parametrize(
    ("section", "value", "key"),
    [
        ({"ttl_s": float("inf")}, "inf", "cache.ttl_s"),
        ({"max_entries": 1e15}, "1e15", "cache.max_entries"),
        ({"max_entries": 10**15}, "10**15", "cache.max_entries"),
    ],
)
def test_unbounded_cache_config_is_a_config_error(stack, tmp_path, section, value, key):
    raw = router_config(stack["creds"], []).model_dump(mode="json")
    raw["cache"] = section
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_router_config(path)


# --- slowloris -----------------------------------------------------------------------------------


def test_headers_that_never_end_time_out(stack):
    with connect(stack["router"].url, stack["creds"].client_ssl) as sock:
        sock.sendall(b"POST /v1/auth/token HTTP/1.1\r\nHost: router\r\n")
        response = read_response(sock, timeout_s=5)
    _assert_router_error(response, 408, "headers not received within 1 s")
    assert response.elapsed_s < 3


def test_body_shorter_than_content_length_times_out(stack):
    with connect(stack["router"].url, stack["creds"].client_ssl) as sock:
        sock.sendall(
            b"POST /v1/auth/token HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"username": '
        )
        response = read_response(sock, timeout_s=5)
    _assert_router_error(response, 408, "body not received within 1 s")
    assert response.elapsed_s < 3
    assert response.headers["connection"] == "close"


def test_oversized_headers_are_431(stack):
    head = b"GET /v1/health HTTP/1.1\r\nHost: router\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    _assert_router_error(_raw(stack, head), 431, "exceed 4096 bytes")
    with connect(stack["router"].url, stack["creds"].client_ssl) as sock:
        # A header that never ends: refused once it passes the limit, not when it is complete.
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: router\r\nX-Big: " + b"a" * 8000)
        response = read_response(sock, timeout_s=5)
    _assert_router_error(response, 431, "exceed 4096 bytes")


def test_declared_oversized_body_is_413(stack):
    response = _raw(
        stack,
        b"POST /v1/auth/token HTTP/1.1\r\nHost: router\r\nContent-Length: 10485760\r\n\r\n",
    )
    _assert_router_error(response, 413, "larger than 262144 bytes")


def test_malformed_http_is_a_json_400(stack):
    response = _raw(stack, b"GET / HTTP/1.1\r\nHost router\r\n\r\n")
    _assert_router_error(response, 400, "malformed HTTP request")


def test_connection_limit(stack):
    url, context = stack["router"].url, stack["creds"].client_ssl
    held = []
    try:
        for _ in range(LIMITS["max_incoming_connections"]):
            held.append(connect(url, context))
        time.sleep(0.2)
        with connect(url, context) as extra:
            response = read_response(extra, timeout_s=5)
        _assert_router_error(response, 503, "too many open connections (limit 8)")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert stack["client"].get("/v1/health").status_code == 200


# --- admin config updates are all or nothing, and always audited --------------------------------


def test_admin_config_update_is_all_or_nothing_and_audited(stack):
    client, admin = stack["client"], bearer(stack["tokens"]["root"])
    grey = bearer(stack["tokens"]["dr-grey"])
    quota_before = client.get("/v1/privacy/budget/dr-grey", headers=grey).json()["quota"]
    for bad in ({"x" * 300: 1.0}, {"someone": 1e13}, {"someone": -1.0}):
        response = client.put(
            "/v1/admin/config",
            json={"user_quotas": {"dr-grey": 7.0, **bad}, "routing_policy": "latency"},
            headers=admin,
        )
        assert response.status_code == 422, response.text
    assert client.get("/v1/privacy/budget/dr-grey", headers=grey).json()["quota"] == quota_before
    assert client.get("/v1/health").json()["routing_policy"] == "least-busy"
    refusals = _audit(stack, "admin_config_refused")
    assert len(refusals) >= 3
    assert refusals[-1]["user"] == "root"
    assert refusals[-1]["status"] == 422

    response = client.put("/v1/admin/config", json={"user_quotas": {"dr-grey": 7.0}}, headers=admin)
    assert response.status_code == 200, response.text
    assert client.get("/v1/privacy/budget/dr-grey", headers=grey).json()["quota"] == 7.0
    assert _audit(stack, "admin_config_changed")[-1]["changes"]["user_quotas"] == {"dr-grey": 7.0}


# --- budgets of other departments ----------------------------------------------------------------


def test_only_admins_read_other_departments_budgets(stack):
    client = stack["client"]
    grey, admin = bearer(stack["tokens"]["dr-grey"]), bearer(stack["tokens"]["root"])
    url = "/v1/privacy/budget/dr-grey"
    refused = client.get(url, params={"department": "oncology"}, headers=grey)
    assert refused.status_code == 403
    assert "department" in refused.json()["detail"]
    assert _audit(stack, "budget_read_denied")[-1]["department"] == "oncology"
    own = client.get(url, params={"department": "cardiology"}, headers=grey)
    assert own.status_code == 200
    other = client.get(url, params={"department": "oncology"}, headers=admin)
    assert other.status_code == 200
    assert other.json()["department"] == "oncology"


# --- admin node management -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["https://", "http://:8081", "https://user:pw@node:1", "ftp://node", "https://node:0"],
)
def test_node_urls_need_a_host(stack, url):
    admin = bearer(stack["tokens"]["root"])
    response = stack["client"].post(
        "/v1/admin/nodes", json={"node_id": "bad", "url": url}, headers=admin
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == "url"
    assert _audit(stack, "admin_node_refused")[-1]["user"] == "root"


def test_nodes_can_be_removed_and_changes_survive_a_restart(stack, tmp_path):
    client, creds = stack["client"], stack["creds"]
    admin, grey = bearer(stack["tokens"]["root"]), bearer(stack["tokens"]["dr-grey"])
    node_b = stack["node_b"]

    assert client.delete("/v1/admin/nodes/a", headers=grey).status_code == 403
    added = client.post("/v1/admin/nodes", json={"node_id": "b", "url": node_b.url}, headers=admin)
    assert added.status_code == 201, added.text
    removed = client.delete("/v1/admin/nodes/a", headers=admin)
    assert removed.status_code == 200, removed.text
    assert client.delete("/v1/admin/nodes/a", headers=admin).status_code == 404
    assert [n["node_id"] for n in client.get("/v1/health").json()["nodes"]] == ["b"]
    assert _audit(stack, "admin_node_removed")[-1]["node_id"] == "a"
    assert 'node_id="a"' not in client.get("/metrics").text

    # A second router on the same database (the YAML still lists only node a) sees b, not a.
    config = router_config(
        creds,
        [("a", "http://127.0.0.1:1")],
        audit={"path": str(tmp_path / "audit.jsonl")},
    )
    second = start_router(config, creds)
    try:
        with httpx.Client(base_url=second.url, verify=creds.client_ssl) as other:
            nodes = other.get("/v1/health").json()["nodes"]
        assert [(n["node_id"], n["url"]) for n in nodes] == [("b", node_b.url)]
    finally:
        second.stop()

    # The stored plain-http node is checked like a YAML one: no mutual-TLS router starts on it.
    mtls = router_config(creds, [], node_tls=_node_tls(creds))
    with pytest.raises(ConfigError, match=r"nodes \['b'\] use plain http://"):
        create_router_app(mtls)


def _node_tls(creds) -> dict[str, str]:
    consortium = creds.consortium
    return {
        "ca_file": str(consortium.ca_cert),
        "client_cert_file": str(consortium.router_client_cert),
        "client_key_file": str(consortium.router_client_key),
    }


def test_mutual_tls_nodes_cannot_be_repointed_to_plain_http(stack, tmp_path):
    creds = stack["creds"]
    node_tls = _node_tls(creds)
    with pytest.raises(ValueError, match="mutual TLS"):
        router_config(creds, [("a", "http://127.0.0.1:1")], node_tls=node_tls)
    database = f"sqlite:///{tmp_path / 'mtls.db'}"
    users = UserStore(database)
    users.add_user("root", PASSWORD, Role.ADMIN, "ops")
    users.close()
    config = router_config(
        creds,
        [],
        node_tls=node_tls,
        database={"url": database},
        audit={"path": str(tmp_path / "audit.jsonl")},
    )
    router = start_router(config, creds)
    try:
        with httpx.Client(base_url=router.url, verify=creds.client_ssl) as client:
            admin = bearer(login(client, "root"))
            response = client.post(
                "/v1/admin/nodes",
                json={"node_id": "secure", "url": "http://127.0.0.1:8081"},
                headers=admin,
            )
            assert response.status_code == 422, response.text
            assert "plain http:// is refused" in response.json()["detail"]
            assert client.get("/v1/health").json()["nodes"] == []
    finally:
        router.stop()
    refusals = _audit_entries(tmp_path / "audit.jsonl", "admin_node_refused")
    assert [entry["status"] for entry in refusals] == [422]
