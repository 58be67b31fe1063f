"""A hospital node's consensus endpoints: noisy ballots only, a noise floor, checks before charge,
and no consensus without client authentication. Real uvicorn servers, a real SQLite ledger."""

from __future__ import annotations

import math
import ssl

import httpx
import numpy as np
import pytest

from fedllm.config.loading import ConfigError
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.security.certs import init_credentials
from fedllm.serving.node.app import create_node_app
from fedllm.serving.node.backends import ConstantBackend
from fedllm.serving.node.config import validate_node_config
from fedllm.serving.node.server import BackgroundServer, tls_options

DELTA = 1e-5
FLOOR = 3.0
VOTE = 1


def _config(tmp_path, **overrides):
    return validate_node_config(
        {
            "node_id": "node-a",
            "hospital_id": "hospital-a",
            "backend": "constant",
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}", "epsilon_cap": 50.0},
            "limits": {"max_prompt_chars": 100, "max_tokens": 64},
            "consensus": {"min_noise_multiplier": FLOOR, "insecure_loopback": True},
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node with a ledger, floor 3 and tight limits; yields (client, ledger)."""
    directory = tmp_path_factory.mktemp("node")
    config = _config(directory)
    ledger = NodePrivacyLedger(config.ledger.url, "hospital-a", epsilon_cap=50.0, delta=DELTA)
    app = create_node_app(config, ConstantBackend(vote_index=VOTE), ledger)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as client:
        yield client, ledger


def _open(client, session, **body):
    payload = {"session_id": session, "prompt": "p", "noise_multiplier": FLOOR, "max_tokens": 2}
    return client.post("/v1/consensus/open", json={**payload, **body})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"noise_multiplier": 2.999}, "noise_multiplier"),
        ({"noise_multiplier": 1e-300}, "noise_multiplier"),
        ({"prompt": "x" * 101}, "prompt"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
    ],
)
def test_a_refused_session_charges_nothing(node, body, field):
    client, ledger = node
    before = ledger.events()
    reply = _open(client, f"refused-{field}-{len(str(body))}", **body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"][0]["loc"] == ["body", field]
    assert ledger.events() == before


def test_ballots_carry_the_noise_the_ledger_was_charged_for(node):
    """Node-side noise: mean one-hot at the vote, std √2·m per entry, fresh per ballot."""
    client, ledger = node
    multiplier, ballots_wanted = 4.0, 60
    ballots = []
    for session in range(6):
        opened = _open(client, f"stats-{session}", noise_multiplier=multiplier, max_tokens=60)
        assert opened.status_code == 200
        assert opened.json()["hospital_id"] == "hospital-a"
        vote = {"session_id": f"stats-{session}", "prompt": "p", "candidates": [5, 6, 7]}
        for _ in range(ballots_wanted):
            ballots.append(client.post("/v1/consensus/vote", json=vote).json()["ballot"])
    values = np.array(ballots)
    assert values.shape == (360, 3)
    std = multiplier * math.sqrt(2)
    assert values.std(axis=0) == pytest.approx([std] * 3, rel=0.12)
    # the vote is only visible on average: per entry mean within 4 standard errors of one-hot
    assert np.all(np.abs(values.mean(axis=0) - [0, 1, 0]) < 4 * std / math.sqrt(len(values)))
    assert len({tuple(row) for row in ballots}) == len(ballots)
    # what was charged is what was added: σ/√2 = multiplier, in the ledger's replace-one units
    consensus_events = [e for e in ledger.events() if e.purpose == "consensus"]
    assert {e.noise_multiplier for e in consensus_events if e.count == 60} == {2 * multiplier}


def test_consensus_needs_client_authentication(tmp_path):
    ledger = {"url": f"sqlite:///{tmp_path / 'l.db'}", "epsilon_cap": 1.0}
    base = {"node_id": "n", "hospital_id": "h", "backend": "constant", "ledger": ledger}
    with pytest.raises(ConfigError, match=r"tls\.client_ca_file"):
        validate_node_config(base)
    with pytest.raises(ConfigError, match="loopback host"):
        validate_node_config({**base, "host": "0.0.0.0", "consensus": {"insecure_loopback": True}})
    assert validate_node_config({**base, "consensus": {"insecure_loopback": True}}).ledger
    # a node without a ledger offers no consensus and needs no client authentication
    assert validate_node_config({k: v for k, v in base.items() if k != "ledger"}).ledger is None
    # the app refuses a ledger handed to it behind the configuration's back
    unauthenticated = validate_node_config({k: v for k, v in base.items() if k != "ledger"})
    spare = NodePrivacyLedger(ledger["url"], "h", epsilon_cap=1.0, delta=DELTA)
    with pytest.raises(ValueError, match="client authentication"):
        create_node_app(unauthenticated, ConstantBackend(), spare)


def test_with_mutual_tls_only_the_consortium_can_open_a_session(tmp_path):
    credentials = init_credentials(tmp_path / "credentials", hospitals=["h1"])
    cert, key = credentials.node_server_certs["h1"]
    config = _config(
        tmp_path,
        consensus={"min_noise_multiplier": FLOOR},
        tls={
            "cert_file": str(cert),
            "key_file": str(key),
            "client_ca_file": str(credentials.ca_cert),
        },
    )
    ledger = NodePrivacyLedger(config.ledger.url, "hospital-a", epsilon_cap=50.0, delta=DELTA)
    app = create_node_app(config, ConstantBackend(), ledger)
    body = {"session_id": "s", "prompt": "p", "noise_multiplier": FLOOR, "max_tokens": 2}
    with BackgroundServer(app, **tls_options(config)) as server:
        anonymous = ssl.create_default_context(cafile=str(credentials.ca_cert))
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.post(f"{server.url}/v1/consensus/open", json=body, verify=anonymous)
        assert ledger.events() == []
        router = ssl.create_default_context(cafile=str(credentials.ca_cert))
        router.load_cert_chain(
            str(credentials.router_client_cert), str(credentials.router_client_key)
        )
        reply = httpx.post(f"{server.url}/v1/consensus/open", json=body, verify=router)
        assert reply.status_code == 200
        health = httpx.get(f"{server.url}/v1/health", verify=router).json()
        assert health["consensus"] == {"min_noise_multiplier": FLOOR, "client_authenticated": True}
        assert health["limits"] == {"max_prompt_chars": 100, "max_tokens": 64}
    assert len(ledger.events()) == 1
