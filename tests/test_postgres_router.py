"""Two router processes (`fedllm router`) on one PostgreSQL database, as replicas behind a load
balancer: quotas stay atomic, lockouts are shared, each replica keeps its own verifiable audit
chain, and either replica reports what the other charged."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import yaml
from router_helpers import (
    CONSENSUS_TOKENS,
    PASSWORD,
    Credentials,
    bearer,
    consensus_cost,
    login,
    node_app,
    router_config,
)

from fedllm.federation.launcher import free_port, stop_process_tree
from fedllm.security.audit import verify_audit_log
from fedllm.security.certs import init_credentials
from fedllm.security.users import Role, UserStore
from fedllm.serving.node.server import BackgroundServer
from fedllm.serving.router.budgets import BudgetLedger

pytest_plugins = ["postgres_server"]

REPLICAS = 2
REQUESTS = 200
CONSENSUS = {"prompt": "q", "max_tokens": CONSENSUS_TOKENS, "require_consensus": True}


def _wait_ready(url: str, creds: Credentials, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            reply = httpx.get(f"{url}/v1/health", verify=creds.client_ssl, timeout=2)
            if reply.status_code == 200 and reply.json()["nodes_healthy"] == 2:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"router at {url} never became ready:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, postgres_server) -> Iterator[dict]:
    directory = tmp_path_factory.mktemp("replicas")
    database = postgres_server.create_database()
    consortium = init_credentials(directory / "credentials", hospitals=["secure"])
    store = UserStore(database)
    for name in ("dave", "erin"):
        store.add_user(name, PASSWORD, Role.CLINICIAN, "icu")
    store.add_user("root", PASSWORD, Role.ADMIN, "it")
    store.close()
    creds = Credentials(directory, consortium, database)
    quota = math.ceil(consensus_cost() * 1e6) * 10 / 1e6  # exactly ten answers
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(BackgroundServer(node_app(directory, name)))
            for name in ("node-a", "node-b")
        ]
        urls = []
        for index in range(REPLICAS):
            port = free_port()
            config = router_config(
                creds,
                [("node-a", nodes[0].url), ("node-b", nodes[1].url)],
                listen={"host": "127.0.0.1", "port": port},
                budgets={"user_quota": quota},
                audit={"path": str(directory / f"audit-{index}.jsonl")},
                limits={"max_incoming_connections": 1024},
            )
            path = directory / f"router-{index}.yaml"
            path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
            log = directory / f"router-{index}.log"
            process = subprocess.Popen(
                [sys.executable, "-m", "fedllm.cli", "router", "--config", str(path)],
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            stack.callback(stop_process_tree, process)
            url = f"https://127.0.0.1:{port}"
            _wait_ready(url, creds, process, log)
            urls.append(url)
        yield {"urls": urls, "creds": creds, "quota": quota, "config": config}


def test_quota_is_atomic_across_two_replicas(replicas):
    creds, urls = replicas["creds"], replicas["urls"]
    with httpx.Client(base_url=urls[0], verify=creds.client_ssl) as client:
        token = login(client, "dave")

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=REQUESTS)
        async with (
            httpx.AsyncClient(verify=creds.client_ssl, timeout=120, limits=limits) as first,
            httpx.AsyncClient(verify=creds.client_ssl, timeout=120, limits=limits) as second,
        ):
            clients = [first, second]
            return await asyncio.gather(
                *(
                    clients[i % REPLICAS].post(
                        f"{urls[i % REPLICAS]}/v1/inference", json=CONSENSUS, headers=bearer(token)
                    )
                    for i in range(REQUESTS)
                )
            )

    responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 10, sorted(set(statuses))
    assert statuses.count(403) == REQUESTS - 10
    served = {i % REPLICAS for i, status in enumerate(statuses) if status == 200}
    assert served, "no replica answered"
    ledger = BudgetLedger(
        creds.database,
        user_quota=replicas["quota"],
        department_quota=1000,
        period_s=replicas["config"].budgets.period_s,
    )
    status = ledger.status("dave", "icu")
    assert status.spent == pytest.approx(replicas["quota"], abs=1e-9)
    assert status.reserved == 0.0
    # either replica reads the history both wrote
    with httpx.Client(base_url=urls[1], verify=creds.client_ssl) as client:
        history = client.get("/v1/privacy/budget/dave/history", headers=bearer(token)).json()
    assert [event["kind"] for event in history["events"]] == ["charge"] * 10


def test_lockout_holds_across_replicas(replicas):
    creds, urls = replicas["creds"], replicas["urls"]
    wrong = {"username": "erin", "password": PASSWORD + "!"}
    statuses = []
    for url in (urls[0], urls[1], urls[0]):  # max_failed_logins is 3, spread over both
        with httpx.Client(base_url=url, verify=creds.client_ssl) as client:
            statuses.append(client.post("/v1/auth/token", json=wrong).status_code)
    assert statuses == [401, 401, 423]
    for url in urls:  # now locked everywhere, right password or not
        with httpx.Client(base_url=url, verify=creds.client_ssl) as client:
            right = client.post("/v1/auth/token", json={"username": "erin", "password": PASSWORD})
            assert right.status_code == 423


def test_each_replica_keeps_its_own_verifiable_audit_chain(replicas):
    creds = replicas["creds"]
    key = creds.consortium.audit_key.read_bytes().strip()
    charges = 0
    for index in range(REPLICAS):
        path = creds.directory / f"audit-{index}.jsonl"
        result = verify_audit_log(path, key)
        assert result.ok, result.error
        events = [json.loads(line)["event"] for line in path.open()]
        charges += events.count("consensus_charge")
    assert charges == 10
