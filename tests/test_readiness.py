"""GET /v1/ready of the router and of a hospital node, through real servers.

The router runs on a real PostgreSQL server that the test stops and starts again, with a real
node behind it that the test stops; the node's readiness is read from a real ModelBackend whose
configured adapter is missing, and from `fedllm serve` with a plain-HTTP probe port in front of
its mutual-TLS API.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from federation_helpers import TINY_TEST_MODEL
from router_helpers import Credentials, make_credentials, node_app, router_config, start_router

from fedllm.config.schema import ModelConfig
from fedllm.security.users import Role
from fedllm.serving.node.app import create_node_app, create_probe_app
from fedllm.serving.node.config import NodeServerConfig
from fedllm.serving.node.generation import ModelBackend
from fedllm.serving.node.server import BackgroundServer

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig.model_validate({**TINY_TEST_MODEL, "lora": {"r": 2, "alpha": 4.0}})
DEADLINE_S = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Postgres:
    """A PostgreSQL server of this test's own (it is stopped mid-test, so never shared)."""

    def __init__(self) -> None:
        initdb = shutil.which("initdb")
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        found = Path(initdb) if initdb else (versions[-1] if versions else None)
        if found is None:
            pytest.skip("PostgreSQL is not installed (no initdb)")
        pytest.importorskip("psycopg")
        self.bin = found.resolve().parent
        self.root = Path(tempfile.mkdtemp(prefix="fedllm-ready-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            shutil.chown(self.root, user="nobody")
            self.as_user = ["runuser", "-u", "nobody", "--"]
        self.port = _free_port()
        self._run("initdb", "-D", str(self.root / "data"), "-U", "postgres", "--auth=trust")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / program), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        data, log = str(self.root / "data"), str(self.root / "server.log")
        self._run("pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")


def wait_for(check: Callable[[], Any]) -> Any:
    """Poll `check` until it returns something truthy (health probes run in the background)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not reached in {DEADLINE_S}s")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres: Postgres
) -> Iterator[tuple[httpx.Client, BackgroundServer]]:
    """A TLS router on PostgreSQL in front of one real node."""
    directory = tmp_path_factory.mktemp("ready")
    creds: Credentials = make_credentials(directory, {"admin": (Role.ADMIN, "it")})
    creds.database = postgres.url
    node = BackgroundServer(node_app(directory, "a")).__enter__()
    router = start_router(router_config(creds, [("a", node.url)]), creds)
    client = httpx.Client(base_url=router.url, verify=creds.client_ssl, timeout=10)
    try:
        yield client, node
    finally:
        client.close()
        router.stop()
        node.stop()


def test_router_is_ready_with_its_database_and_a_healthy_node(
    stack: tuple[httpx.Client, BackgroundServer],
) -> None:
    client, _ = stack
    response = client.get("/v1/ready")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "problems": []}


def test_router_is_not_ready_while_its_database_is_down_and_ready_again_after(
    stack: tuple[httpx.Client, BackgroundServer], postgres: Postgres
) -> None:
    client, _ = stack
    postgres.stop()
    try:
        response = client.get("/v1/ready")
        assert response.status_code == 503
        assert response.json()["problems"] == ["database unreachable"]
        assert client.get("/v1/health").status_code == 200  # liveness is not affected
    finally:
        postgres.start()
    wait_for(lambda: client.get("/v1/ready").status_code == 200)


def test_router_is_not_ready_once_no_node_is_healthy(
    stack: tuple[httpx.Client, BackgroundServer],
) -> None:
    client, node = stack
    node.stop()
    response = wait_for(lambda: (r := client.get("/v1/ready")).status_code == 503 and r)
    assert response.json()["problems"] == ["no healthy node"]
    assert client.get("/v1/health").json()["nodes_healthy"] == 0


def test_node_is_not_ready_while_its_configured_adapter_is_not_loaded(tmp_path: Path) -> None:
    config = NodeServerConfig(node_id="n", hospital_id="h", adapter_dir=tmp_path / "published")
    backend = ModelBackend(TINY, adapter_dir=config.adapter_dir, reload_interval_s=0, device="cpu")
    app = create_node_app(config, backend)
    for served in (app, create_probe_app(app)):
        with BackgroundServer(served) as server:
            response = httpx.get(server.url + "/v1/ready")
        assert response.status_code == 503
        assert response.json()["problems"] == ["the DP adapter is not loaded"]


def test_fedllm_serve_answers_readiness_on_its_plain_probe_port_only(tmp_path: Path) -> None:
    """The probe port answers GET /v1/ready without a client certificate; the API port still
    refuses a caller without one, and the probe port serves nothing else."""
    creds = make_credentials(tmp_path, {})
    cert, key = creds.consortium.node_server_certs["secure"]
    port, probe_port = _free_port(), _free_port()
    config = {
        "node_id": "n",
        "hospital_id": "secure",
        "backend": "constant",
        "port": port,
        "probe_port": probe_port,
        "tls": {
            "cert_file": str(cert),
            "key_file": str(key),
            "client_ca_file": str(creds.consortium.ca_cert),
        },
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    fedllm = Path(sys.executable).parent / "fedllm"
    process = subprocess.Popen(
        [str(fedllm), "serve", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    probe = f"http://127.0.0.1:{probe_port}"
    try:
        response = wait_for(lambda: _get(probe + "/v1/ready"))
        assert response.status_code == 200
        assert response.json() == {"ready": True, "problems": []}
        assert httpx.get(probe + "/v1/health").status_code == 404
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"https://127.0.0.1:{port}/v1/ready", verify=creds.client_ssl)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None
