"""Real servers for the router tests: hospital nodes (ConstantBackend + a real ledger) and a
TLS router, each served by uvicorn on loopback; plus keys, certificates and users."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedllm.privacy.consensus import ConsensusMechanism
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.security.certs import Credentials as ConsortiumCredentials
from fedllm.security.certs import init_credentials
from fedllm.security.users import Role, UserStore
from fedllm.serving.node.app import create_node_app
from fedllm.serving.node.backends import ConstantBackend
from fedllm.serving.node.config import NodeConsensusConfig, NodeLedgerConfig, NodeServerConfig
from fedllm.serving.node.server import BackgroundServer
from fedllm.serving.router import RouterConfig, create_router_app

PASSWORD = "correct horse battery staple"
DELTA = 1e-5
NOISE_STD = 20.0
CONSENSUS_TOKENS = 2


def consensus_cost(max_tokens: int = CONSENSUS_TOKENS) -> float:
    """ε the router charges for one consensus answer in these tests."""
    return ConsensusMechanism(vote_noise_std=NOISE_STD).epsilon_cost(max_tokens, DELTA)


def node_app(
    directory: Path,
    node_id: str,
    *,
    cap: float = 1000.0,
    hospital: str | None = None,
    floor: float = 2.0,
    **backend: Any,
) -> Any:
    """A hospital node: ConstantBackend and a real NodePrivacyLedger on its hospital's SQLite file.

    Plain HTTP on loopback, so consensus runs under ``insecure_loopback`` (the mutual-TLS path is
    exercised by tests/test_node_consensus.py and tests/test_serving_stack.py).
    """
    hospital = hospital or f"hospital-{node_id}"
    url = f"sqlite:///{directory / f'{hospital}-ledger.db'}"
    config = NodeServerConfig(
        node_id=node_id,
        hospital_id=hospital,
        backend="constant",
        specialisations=[f"spec-{node_id}"],
        ledger=NodeLedgerConfig(url=url, epsilon_cap=cap, delta=DELTA),
        consensus=NodeConsensusConfig(min_noise_multiplier=floor, insecure_loopback=True),
    )
    ledger = NodePrivacyLedger(url, hospital, epsilon_cap=cap, delta=DELTA)
    return create_node_app(config, ConstantBackend(**backend), ledger)


def node_ledger(directory: Path, node_id: str, cap: float = 1000.0) -> NodePrivacyLedger:
    url = f"sqlite:///{directory / f'hospital-{node_id}-ledger.db'}"
    return NodePrivacyLedger(url, f"hospital-{node_id}", epsilon_cap=cap, delta=DELTA)


@dataclass
class Credentials:
    directory: Path
    consortium: ConsortiumCredentials
    database: str
    client_ssl: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        self.client_ssl = ssl.create_default_context(cafile=str(self.consortium.ca_cert))


def make_credentials(directory: Path, users: dict[str, tuple[Role, str]]) -> Credentials:
    """The consortium's credentials (`fedllm certs init`) and a user database with `users`."""
    consortium = init_credentials(directory / "credentials", hospitals=["secure"])
    database = f"sqlite:///{directory / 'router.db'}"
    store = UserStore(database)
    for username, (role, department) in users.items():
        store.add_user(username, PASSWORD, role, department)
    store.close()
    return Credentials(directory, consortium, database)


def router_config(
    creds: Credentials, nodes: list[tuple[str, str] | dict[str, Any]], **sections: Any
) -> RouterConfig:
    """A TLS router over `nodes` ((node_id, url), or node config mappings); `sections`
    override config sections."""
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "tls": {
            "cert_file": str(creds.consortium.router_cert),
            "key_file": str(creds.consortium.router_key),
        },
        "database": {"url": creds.database},
        "auth": {
            "signing_key_file": str(creds.consortium.jwt_private_key),
            "max_failed_logins": 3,
        },
        "rate_limit": {
            "requests_per_s": 10_000,
            "burst": 10_000,
            "login_per_s": 1000,
            "login_burst": 1000,
            "login_user_per_s": 1000,
            "login_user_burst": 1000,
        },
        "budgets": {"user_quota": 100.0, "department_quota": 1000.0, "delta": DELTA},
        "nodes": [
            node if isinstance(node, dict) else {"node_id": node[0], "url": node[1]}
            for node in nodes
        ],
        "routing": {"health_interval_s": 0.2, "retries": 2, "timeout_s": 10},
        "consensus": {"vote_noise_std": NOISE_STD, "top_k": 4, "min_nodes": 2},
        "audit": {
            "path": str(creds.directory / "audit.jsonl"),
            "redaction_key_file": str(creds.consortium.audit_key),
        },
    }
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **value}
        else:
            raw[section] = value
    return RouterConfig.model_validate(raw)


def start_router(config: RouterConfig, creds: Credentials) -> BackgroundServer:
    """The router app served with TLS on a free port (entered; call .stop())."""
    server = BackgroundServer(
        create_router_app(config),
        ssl_certfile=str(creds.consortium.router_cert),
        ssl_keyfile=str(creds.consortium.router_key),
    )
    return server.__enter__()


def login(client: httpx.Client, username: str, password: str = PASSWORD) -> str:
    response = client.post("/v1/auth/token", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
