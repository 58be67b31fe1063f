"""Routing around a dead hospital node, and probing it back when it returns."""

from __future__ import annotations

import ssl
import time

import httpx
import pytest
from router_helpers import (
    bearer,
    login,
    make_credentials,
    node_app,
    router_config,
    start_router,
)

from fedllm.security.users import Role
from fedllm.serving.node.server import BackgroundServer


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_dead_node_is_routed_around_and_probed_back(tmp_path):
    creds = make_credentials(
        tmp_path, {"alice": (Role.CLINICIAN, "icu"), "root": (Role.ADMIN, "it")}
    )
    flaky = BackgroundServer(node_app(tmp_path, "flaky")).start()
    with BackgroundServer(node_app(tmp_path, "steady")) as steady:
        config = router_config(
            creds,
            [("flaky", flaky.url), ("steady", steady.url)],
            cache={"max_entries": 0},
        )
        router = start_router(config, creds)
        try:
            with httpx.Client(base_url=router.url, verify=creds.client_ssl, timeout=30) as client:
                token = login(client, "alice")

                def node_health(node_id: str) -> bool:
                    nodes = client.get("/v1/health").json()["nodes"]
                    return next(n for n in nodes if n["node_id"] == node_id)["healthy"]

                assert node_health("flaky")
                assert node_health("steady")
                flaky.stop()
                answers = [
                    client.post("/v1/inference", json={"prompt": f"q{i}"}, headers=bearer(token))
                    for i in range(10)
                ]
                assert [a.status_code for a in answers] == [200] * 10
                assert {a.json()["node_id"] for a in answers} == {"steady"}
                assert _wait_for(lambda: not node_health("flaky"))
                assert client.get("/v1/health").json()["nodes_healthy"] == 1
                metrics = client.get("/metrics").text
                assert 'fedllm_router_node_healthy{node_id="flaky"} 0.0' in metrics

                flaky = BackgroundServer(node_app(tmp_path, "flaky"), port=flaky.port).start()
                assert _wait_for(lambda: node_health("flaky"))
                served = {
                    client.post(
                        "/v1/inference", json={"prompt": f"r{i}"}, headers=bearer(token)
                    ).json()["node_id"]
                    for i in range(20)
                }
                assert "flaky" in served

                # A node added at runtime by an admin is probed at once and used.
                root = login(client, "root")
                with BackgroundServer(node_app(tmp_path, "late")) as late:
                    added = client.post(
                        "/v1/admin/nodes",
                        json={"node_id": "late", "url": late.url, "specialisations": ["icu"]},
                        headers=bearer(root),
                    )
                    assert added.status_code == 201
                    assert added.json()["healthy"] is True
                    change = client.put(
                        "/v1/admin/config",
                        json={"routing_policy": "specialisation"},
                        headers=bearer(root),
                    )
                    assert change.status_code == 200
                    routed = client.post(
                        "/v1/inference", json={"prompt": "icu q"}, headers=bearer(token)
                    )
                    assert routed.json()["node_id"] == "late"
        finally:
            router.stop()
            flaky.stop()


def test_no_healthy_node_is_503(tmp_path):
    creds = make_credentials(tmp_path, {"alice": (Role.CLINICIAN, "icu")})
    config = router_config(creds, [("gone", "http://127.0.0.1:9")])
    router = start_router(config, creds)
    try:
        with httpx.Client(base_url=router.url, verify=creds.client_ssl) as client:
            token = login(client, "alice")
            response = client.post("/v1/inference", json={"prompt": "q"}, headers=bearer(token))
            assert response.status_code == 503
            assert "no healthy hospital node" in response.json()["detail"]
            assert client.get("/v1/health").json()["status"] == "degraded"
    finally:
        router.stop()


def test_mutual_tls_to_nodes(tmp_path):
    """With node_tls the router verifies the node's certificate and presents its own."""
    router_dir, node_dir = tmp_path / "router", tmp_path / "node"
    router_dir.mkdir()
    node_dir.mkdir()
    creds = make_credentials(router_dir, {"alice": (Role.CLINICIAN, "icu")})
    consortium = creds.consortium
    client_cert, client_key = consortium.router_client_cert, consortium.router_client_key
    node_cert, node_key = consortium.node_server_certs["secure"]
    ca_cert = consortium.ca_cert
    node = BackgroundServer(
        node_app(node_dir, "secure"),
        ssl_certfile=str(node_cert),
        ssl_keyfile=str(node_key),
        ssl_ca_certs=str(ca_cert),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    with node:
        tls = {
            "ca_file": str(ca_cert),
            "client_cert_file": str(client_cert),
            "client_key_file": str(client_key),
        }
        config = router_config(creds, [("secure", node.url)], node_tls=tls)
        router = start_router(config, creds)
        try:
            with httpx.Client(base_url=router.url, verify=creds.client_ssl) as client:
                token = login(client, "alice")
                answer = client.post("/v1/inference", json={"prompt": "q"}, headers=bearer(token))
                assert answer.status_code == 200
                assert answer.json()["node_id"] == "secure"
            # Without the client certificate the node refuses the handshake.
            with pytest.raises(httpx.HTTPError):
                httpx.get(
                    f"{node.url}/v1/health",
                    verify=ssl.create_default_context(cafile=str(ca_cert)),
                )
        finally:
            router.stop()

        untrusted = router_config(creds, [("secure", node.url)], node_tls={"ca_file": str(ca_cert)})
        router = start_router(untrusted, creds)
        try:
            with httpx.Client(base_url=router.url, verify=creds.client_ssl) as client:
                token = login(client, "alice")
                refused = client.post("/v1/inference", json={"prompt": "q"}, headers=bearer(token))
                assert refused.status_code == 503
        finally:
            router.stop()
