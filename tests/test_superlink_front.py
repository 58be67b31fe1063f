"""The SuperLink's public front, with real processes: `fedllm superlink start` (TLS, SuperNode
authentication, flower-superlink on 127.0.0.1, the front on the public port), a real
`flower-supernode` with its authentication key that activates through the front, and the Flower
CLI's Control API requests: refused through the front, served on the loopback port."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedllm.federation.deployment import supernode_command, write_node_config
from fedllm.federation.flower_cli import write_flower_connection
from fedllm.federation.launcher import flower_environment, free_port, stop_process_tree
from fedllm.federation.node_registry import (
    NodeRegistry,
    key_fingerprint,
    node_id_in_superlink_db,
)
from fedllm.federation.processes import start_process
from fedllm.federation.superlink_front import refusal
from fedllm.security.certs import init_credentials

pytestmark = pytest.mark.integration

ACTIVATED = "[Fleet.ActivateNode] Activated"


class Link:
    """A running `fedllm superlink start` and what the tests need to reach it."""

    def __init__(self, root: Path, creds, front: str, control: str) -> None:
        self.root, self.creds, self.front, self.control = root, creds, front, control
        self.state = root / "superlink"

    def log(self, name: str) -> str:
        path = self.state / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def flwr(self, address: str, *args: str) -> dict:
        home = self.root / f"flwr-{address.replace(':', '-')}"
        write_flower_connection(home, "link", address, self.creds.ca_cert)
        result = subprocess.run(
            ["flwr", *args, "link", "--format", "json"],
            env=flower_environment(home),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return json.loads(result.stdout)

    def supernode(self, name: str) -> subprocess.Popen[bytes]:
        private, _ = self.creds.supernode_keys[name]
        config = write_node_config(self.root / name / "node.toml", {"hospital-name": name})
        command = supernode_command(
            superlink=self.front,
            root_certificates=self.creds.ca_cert,
            auth_private_key=private,
            node_config_file=config,
            clientapp_port=free_port(),
            max_retries=0,
        )
        return start_process(command, self.root / name / "flwr", self.root / name / "node.log")


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    root = tmp_path_factory.mktemp("front")
    creds = init_credentials(root / "credentials", hospitals=["north", "rogue"])
    port, control_port = free_port(), free_port()
    output = (root / "superlink.out").open("ab")
    options = {
        "--credentials": creds.root,
        "--host": "127.0.0.1",
        "--port": port,
        "--control-port": control_port,
        "--state-dir": root / "superlink",
        "--hospital": "north",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedllm.cli",
            "superlink",
            "start",
            *(part for option, value in options.items() for part in (option, str(value))),
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, FLWR_HOME=str(root / "operator")),
        start_new_session=True,
    )
    started = Link(root, creds, f"127.0.0.1:{port}", f"127.0.0.1:{control_port}")
    try:
        deadline = time.monotonic() + 90
        while "Ctrl-C stops" not in (root / "superlink.out").read_text():
            assert process.poll() is None, (root / "superlink.out").read_text()
            assert time.monotonic() < deadline, (root / "superlink.out").read_text()
            time.sleep(0.3)
        yield started
    finally:
        stop_process_tree(process)


def test_the_superlink_listens_on_loopback_and_the_front_on_the_public_port(link):
    banner = (link.root / "superlink.out").read_text()
    assert f"SuperLink front on {link.front}" in banner
    assert f"SuperLink on {link.control}" in banner
    assert f"Logs: {link.state / 'superlink.log'}, {link.state / 'front.log'}." in banner
    assert f'address = "{link.control}"' in banner  # researchers use the loopback port
    assert "Starting the SuperLink Control HTTP API on 127.0.0.1:" in link.log("superlink")
    assert "SuperNode authentication is disabled" not in link.log("superlink")


def test_a_registered_supernode_activates_through_the_front(link):
    node = link.supernode("north")
    try:
        deadline = time.monotonic() + 60
        while ACTIVATED not in link.log("superlink"):
            assert node.poll() is None, (link.root / "north" / "node.log").read_text()
            assert time.monotonic() < deadline, (link.root / "north" / "node.log").read_text()
            time.sleep(0.3)
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 200' in link.log("front")
        nodes = link.flwr(link.control, "supernode", "ls")["nodes"]
        assert [n["status"] for n in nodes] == ["online"]
    finally:
        stop_process_tree(node)


def test_an_unregistered_key_is_refused_through_the_front(link):
    node = link.supernode("rogue")
    try:
        assert node.wait(timeout=90) != 0
    finally:
        stop_process_tree(node)
    assert "Failed to activate SuperNode" in (link.root / "rogue" / "node.log").read_text()


def test_the_control_api_is_refused_through_the_front_and_served_on_loopback(link):
    _, rogue_key = link.creds.supernode_keys["rogue"]
    through_front = link.flwr(link.front, "ls")
    assert through_front["success"] is False
    assert "403 Forbidden" in through_front["error-message"]
    registered = link.flwr(link.front, "supernode", "register", str(rogue_key))
    assert "403 Forbidden" in registered["error-message"]
    assert "POST /v1/control/register-node: the Control API" in link.log("front")
    assert link.flwr(link.control, "ls") == {"success": True, "runs": []}
    # the refused registration never reached the SuperLink: the rogue key is still unknown
    assert len(link.flwr(link.control, "supernode", "ls")["nodes"]) == 1


def _raw(address: str, ca_cert: Path, request: bytes) -> tuple[int, bytes]:
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca_cert))
    with (
        socket.create_connection((host, int(port)), timeout=10) as plain,
        context.wrap_socket(plain, server_hostname=host) as tls,
    ):
        tls.sendall(request)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "target",
    [
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/v1/fleet/pull-messages?x=1",
        "/v1/runtime/get-nodes",
        "/docs",
        "/openapi.json",
    ],
)
def test_the_front_refuses_anything_but_fleet_requests_even_disguised(link, target):
    request = (
        f"POST {target} HTTP/1.1\r\nHost: {link.front}\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    status, body = _raw(link.front, link.creds.ca_cert, request)
    assert status == 403
    assert b"is not served on this port" in body
    assert len(body.strip().splitlines()) == 1


def test_health_passes_through_the_front(link):
    context = ssl.create_default_context(cafile=str(link.creds.ca_cert))
    answer = httpx.get(f"https://{link.front}/health", verify=context)
    assert answer.status_code == 200


def test_registration_records_the_hospital_key_and_node_id_privately(link):
    path = link.state / "node-registry.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = NodeRegistry.load(path).entries["north"]
    assert entry.key_sha256 == key_fingerprint(link.creds.supernode_keys["north"][1])
    nodes = link.flwr(link.control, "supernode", "ls")["nodes"]
    assert [int(n["node-id"]) for n in nodes] == [entry.node_id]
    # what `superlink start` falls back to when Flower says "already registered"
    database = link.state / "superlink.db"
    assert node_id_in_superlink_db(database, link.creds.supernode_keys["north"][1]) == entry.node_id
    assert "rogue" not in NodeRegistry.load(path).entries


def test_refusal_names_the_api_in_one_line():
    assert refusal("POST", "/v1/fleet/push-messages") is None
    assert refusal("GET", "/health") is None
    assert refusal("GET", "/v1/fleet/push-messages") is not None
    reason = refusal("POST", "/v1/control/start-run")
    assert reason is not None
    assert "Control API" in reason
    assert "\n" not in reason
