"""The serving stack as operators run it: `fedllm certs init`, `fedllm users add`, two hospitals'
`fedllm serve` (real tiny model, encrypted adapter and ledgers, mutual TLS) and `fedllm router`
(TLS), each a real process; a clinician's OpenAI client and a consensus answer through it."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import yaml
from federation_helpers import TINY_TEST_MODEL
from typer.testing import CliRunner

from fedllm.cli.app import app as cli_app
from fedllm.config.schema import ModelConfig
from fedllm.federation.launcher import stop_process_tree
from fedllm.models.checkpoints import publish_adapter
from fedllm.models.loading import load_lora_model
from fedllm.privacy.consensus import ConsensusMechanism, ledger_event
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.security.certs import load_credentials
from fedllm.security.encryption import KeyRing
from fedllm.security.environment import ENV_VAR

pytestmark = pytest.mark.integration

HOSPITALS = ("north", "south")
PASSWORD = "stack test password"
DELTA = 1e-5
CAP = 50.0
NOISE_STD = 3.0
MAX_TOKENS = 3
MODEL = {**TINY_TEST_MODEL, "lora": {"r": 2, "alpha": 4.0}}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _process(args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A `fedllm` command in its own session, with its whole process tree stopped on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fedllm.cli", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        stop_process_tree(process)


def _wait_healthy(url: str, verify: Any, process: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            reply = httpx.get(f"{url}/v1/health", verify=verify, timeout=2)
            if reply.status_code == 200 and reply.json()["status"] == "ok":
                return reply.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not healthy:\n{log.read_text()[-3000:]}")


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def keyring() -> KeyRing:
    return KeyRing.generate()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, keyring) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("stack")
    runner = CliRunner()
    hospitals = [arg for name in HOSPITALS for arg in ("--hospital", name)]
    result = runner.invoke(
        cli_app, ["certs", "init", "--out", str(work / "credentials"), *hospitals]
    )
    assert result.exit_code == 0, result.output
    creds = load_credentials(work / "credentials")
    database = f"sqlite:///{work / 'router.db'}"
    result = runner.invoke(
        cli_app,
        [
            *("users", "add", "dr-grey", "--role", "clinician", "--department", "cardiology"),
            *("--db", database, "--password-stdin"),
        ],
        input=PASSWORD + "\n",
    )
    assert result.exit_code == 0, result.output

    env = {**os.environ, ENV_VAR: keyring.to_json(), "FEDLLM_LOG_LEVEL": "WARNING"}
    # the server publishes the adapter encrypted; the nodes read their key ring from `env`
    model_config = ModelConfig.model_validate(MODEL)
    model = load_lora_model(model_config, torch.device("cpu"), seed=3)
    publish_adapter(  # with its DP record: nodes serve no adapter without one
        model,
        work / "checkpoint",
        run_id="stack",
        privacy={
            "enabled": True,
            "delta": DELTA,
            "accountant": "pld",
            "unit": "patient",
            "neighbouring": "replace-one",
            "hospitals": {
                name: {"epsilon": 1.0, "epsilon_cap": CAP, "epsilon_confirmed": True}
                for name in HOSPITALS
            },
        },
        model_config=model_config,
        keyring=keyring,
    )

    nodes = []
    for name in HOSPITALS:
        cert, key = creds.node_server_certs[name]
        port = _free_port()
        config = {
            "node_id": f"{name}-node",
            "hospital_id": name,
            "port": port,
            "model": MODEL,
            "device": "cpu",
            "adapter_dir": str(work / "checkpoint"),
            "specialisations": ["cardiology"],
            "tls": {
                "cert_file": str(cert),
                "key_file": str(key),
                "client_ca_file": str(creds.ca_cert),
            },
            "ledger": {
                "url": f"sqlite:///{work / f'{name}.db'}",
                "epsilon_cap": CAP,
                "delta": DELTA,
            },
        }
        nodes.append(
            (name, f"https://127.0.0.1:{port}", _write_yaml(work / f"{name}.yaml", config))
        )

    router_port = _free_port()
    router_config = {
        "listen": {"host": "127.0.0.1", "port": router_port},
        "tls": {"cert_file": str(creds.router_cert), "key_file": str(creds.router_key)},
        "database": {"url": database},
        "auth": {"signing_key_file": str(creds.jwt_private_key)},
        "budgets": {"user_quota": 100.0, "department_quota": 1000.0, "delta": DELTA},
        "nodes": [{"node_id": f"{name}-node", "url": url} for name, url, _ in nodes],
        "node_tls": {
            "ca_file": str(creds.ca_cert),
            "client_cert_file": str(creds.router_client_cert),
            "client_key_file": str(creds.router_client_key),
        },
        "routing": {"health_interval_s": 0.5},
        "consensus": {"vote_noise_std": NOISE_STD, "top_k": 4, "min_nodes": 2},
        "audit": {"path": str(work / "audit.jsonl"), "redaction_key_file": str(creds.audit_key)},
    }
    router_file = _write_yaml(work / "router.yaml", router_config)

    router_client = ssl.create_default_context(cafile=str(creds.ca_cert))
    node_client = ssl.create_default_context(cafile=str(creds.ca_cert))
    node_client.load_cert_chain(str(creds.router_client_cert), str(creds.router_client_key))
    with ExitStack() as stack:
        started = []
        for name, url, config_file in nodes:
            log = work / f"{name}.log"
            process = stack.enter_context(
                _process(["serve", "--config", str(config_file)], log, env)
            )
            started.append((url, process, log))
        log = work / "router.log"
        router = stack.enter_context(_process(["router", "--config", str(router_file)], log, env))
        health = [_wait_healthy(url, node_client, process, log) for url, process, log in started]
        router_url = f"https://127.0.0.1:{router_port}"
        _wait_healthy(router_url, router_client, router, log)
        yield {
            "work": work,
            "router_url": router_url,
            "verify": router_client,
            "node_urls": [url for _, url, _ in nodes],
            "node_health": health,
            "credentials": creds,
        }


def _token(stack: dict[str, Any]) -> str:
    reply = httpx.post(
        f"{stack['router_url']}/v1/auth/token",
        json={"username": "dr-grey", "password": PASSWORD},
        verify=stack["verify"],
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["access_token"]


def test_nodes_serve_the_encrypted_adapter_and_refuse_clients_without_a_certificate(stack):
    for health in stack["node_health"]:
        assert health["model_version"] != "base"  # the encrypted adapter was decrypted and loaded
        assert health["adapter"]["dp_record"]["run_id"] == "stack"  # and its DP record checked
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{stack['node_urls'][0]}/v1/health", verify=stack["verify"], timeout=5)


def test_openai_client_through_the_router_gets_a_free_answer(stack):
    client = openai.OpenAI(
        base_url=f"{stack['router_url']}/v1",
        api_key=_token(stack),
        http_client=httpx.Client(verify=stack["verify"]),
    )
    raw = client.chat.completions.with_raw_response.create(
        model="fedllm", messages=[{"role": "user", "content": "chest pain"}], max_tokens=4
    )
    answer = raw.parse()
    assert answer.choices[0].message.content
    assert float(raw.headers["X-Privacy-Cost"]) == 0.0


def _wait_all_nodes_healthy(stack: dict[str, Any], timeout_s: float = 60) -> None:
    """The router's view of node health is its latest probe; one slow probe on a loaded machine
    marks a node unhealthy until the next, so consensus (which needs every node) waits for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(f"{stack['router_url']}/v1/health", verify=stack["verify"]).json()
        if health["nodes_healthy"] == health["nodes_total"]:
            return
        assert time.monotonic() < deadline, health
        time.sleep(0.2)


def test_consensus_answer_charges_the_user_and_every_hospital_the_same_mechanism(stack, keyring):
    token = _token(stack)
    headers = {"Authorization": f"Bearer {token}"}
    budget_url = f"{stack['router_url']}/v1/privacy/budget/dr-grey"
    before = httpx.get(budget_url, headers=headers, verify=stack["verify"]).json()
    _wait_all_nodes_healthy(stack)
    reply = httpx.post(
        f"{stack['router_url']}/v1/inference",
        json={
            "prompt": "Chest pain on exertion.",
            "max_tokens": MAX_TOKENS,
            "require_consensus": True,
        },
        headers=headers,
        verify=stack["verify"],
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    mechanism = ConsensusMechanism(vote_noise_std=NOISE_STD)
    cost = mechanism.epsilon_cost(MAX_TOKENS, DELTA)
    assert answer["privacy_cost"] == pytest.approx(cost, rel=1e-6)
    assert answer["consensus_reached"] in (True, False)
    assert 0.0 <= answer["confidence_score"] <= 1.0
    after = httpx.get(budget_url, headers=headers, verify=stack["verify"]).json()
    assert after["spent"] - before["spent"] == pytest.approx(cost, abs=2e-6)

    for name in HOSPITALS:  # the node ledgers are encrypted at rest
        url = f"sqlite:///{stack['work'] / f'{name}.db'}"
        ledger = NodePrivacyLedger(url, name, epsilon_cap=CAP, delta=DELTA, keyring=keyring)
        assert ledger.events() == [ledger_event(mechanism.noise_multiplier, MAX_TOKENS)]
        assert ledger.spent_epsilon() == pytest.approx(cost, rel=1e-6)

    audit = str(stack["work"] / "audit.jsonl")
    key = str(stack["credentials"].audit_key)
    verified = CliRunner().invoke(cli_app, ["audit", "verify", audit, "--key-file", key])
    assert verified.exit_code == 0, verified.output
    assert "Chest pain" not in (stack["work"] / "audit.jsonl").read_text()
