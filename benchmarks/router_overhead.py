"""Latency the router adds, and its throughput, against a constant-time hospital node.

Node and router run as separate processes (`fedllm serve`, `fedllm router`), so the client
measures the servers, not itself. The node uses the ConstantBackend (a fixed reply in
constant time), so every microsecond above "straight to the node" is the router's: TLS to the
client, token check, rate limit, routing, the pooled HTTP call to the node, budget lookup,
metrics. The response cache is off so every request is forwarded. Sequential requests give
added p50/p99 latency (router and direct requests alternate in blocks so machine drift hits
both alike); concurrent requests give throughput through the router. Run:

    .venv/bin/python benchmarks/router_overhead.py [--requests 2000] [--concurrency 64]
        [--throughput-requests 5000] [--consensus 20] [--zero-quota 200] [--no-tls]
    .venv/bin/python benchmarks/router_overhead.py --replicas-postgres [--concurrency 32]
        [--replica-requests 2000] [--replica-consensus 200] [--consensus-concurrency 4]
        [--rounds 2]
    .venv/bin/python benchmarks/router_overhead.py --clients [--concurrency 64]
        [--client-requests 6000] [--rounds 2]

Goals: added p50 <= 2 ms, added p99 <= 10 ms, >= 1000 req/s through the router, and a consensus
request from a user with no quota left refused (403) in <= 10 ms p99, whatever its max_tokens
(``--zero-quota N`` sends N such requests, each with a max_tokens not asked before, so no cost is
served from a cache). On a small machine the client, router and node share the cores: say so
when quoting the numbers.

``--replicas-postgres`` instead compares sustained throughput (requests/s, p50/p99 latency at
``--concurrency`` / ``--consensus-concurrency`` clients) of one router on SQLite with two
router replicas sharing one PostgreSQL server (started here from the distribution's binaries),
requests spread evenly over the two, against the same two constant-time nodes: 0-ε answers,
which read a cached budget view, and 1-token consensus answers, which reserve and commit ε in
the router database (and charge both hospitals' ledgers). The setups alternate in
``--rounds`` blocks of the same run.

``--clients`` instead measures the router → node hop alone: POST /v1/inference to one
constant-time node with the router's hand-written client, httpx and (when installed) aiohttp,
alternating rounds, same concurrency: requests/s, p50/p99 and the client's CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from bench_postgres import running_postgres

from fedllm.federation.launcher import stop_process_tree
from fedllm.security.certs import init_credentials
from fedllm.security.users import Role, UserStore
from fedllm.serving.router.http_client import NodeClient

PASSWORD = "benchmark password, not a secret"
GOALS = {"p50_ms": 2.0, "p99_ms": 10.0, "throughput": 1000.0, "refusal_p99_ms": 10.0}
BLOCK = 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "FEDLLM_LOG_LEVEL": "WARNING", "FEDLLM_LOG_JSON": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedllm.cli", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def wait_ready(url: str, verify: Any, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/v1/health", verify=verify, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up:\n{log.read_text()}")


def setup(work: Path, tls: bool, nodes: int) -> tuple[list[dict], dict, Any]:
    """Node configs, router config and the client's TLS verification."""
    node_configs = []
    for index in range(nodes):
        node_configs.append(
            {
                "node_id": f"bench-{index}",
                "hospital_id": f"bench-hospital-{index}",
                "port": free_port(),
                "backend": "constant",
                "ledger": {
                    "url": f"sqlite:///{work / f'node-{index}.db'}",
                    "epsilon_cap": 1.0e6,
                },
                # loopback plain HTTP: no client certificates to authenticate the router with
                "consensus": {"insecure_loopback": True},
            }
        )
    creds = init_credentials(work / "credentials", hospitals=["bench"])
    database = f"sqlite:///{work / 'router.db'}"
    store = UserStore(database)
    store.add_user("bench", PASSWORD, Role.CLINICIAN, "cardiology")
    store.add_user("broke", PASSWORD, Role.CLINICIAN, "cardiology")
    store.close()
    router: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "database": {"url": database},
        "auth": {"signing_key_file": str(creds.jwt_private_key)},
        "rate_limit": {"requests_per_s": 1e6, "burst": 1_000_000},
        "budgets": {
            "user_quota": 1e6,
            "department_quota": 1e6,
            "quota_overrides": {"broke": 0.0},
        },
        "nodes": [
            {
                "node_id": n["node_id"],
                "url": f"http://127.0.0.1:{n['port']}",
                "hospital_id": n["hospital_id"],
            }
            for n in node_configs
        ],
        "routing": {"policy": "least-busy"},
        "cache": {"max_entries": 0},
        "consensus": {"vote_noise_std": 40.0, "top_k": 4, "min_nodes": min(2, nodes)},
        "audit": {"path": str(work / "audit.jsonl"), "redaction_key_file": str(creds.audit_key)},
    }
    verify: Any = True
    if tls:
        router["tls"] = {"cert_file": str(creds.router_cert), "key_file": str(creds.router_key)}
        verify = ssl.create_default_context(cafile=str(creds.ca_cert))
    else:
        router["insecure"] = True
    return node_configs, router, verify


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), robust to a busy machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def lean_client(verify: Any, concurrency: int) -> NodeClient:
    """The router's own keep-alive client as the load generator: httpx's pool bookkeeping
    costs more CPU per request than the servers under test, on the same cores."""
    context = verify if isinstance(verify, ssl.SSLContext) else None
    return NodeClient(
        ssl_context=context,
        timeout_s=60,
        connect_timeout_s=10,
        max_connections=concurrency,
        max_idle_connections=concurrency,
    )


async def sequential(
    router_url: str, node_url: str, verify: Any, token: str, n: int, pids: dict[str, int]
) -> dict:
    """Alternating blocks of direct and routed requests; per-request latency in ms, and the
    CPU time the router and the node spent per routed request."""
    direct: list[float] = []
    routed: list[float] = []
    cpu = {"router": 0.0, "node": 0.0}
    client = lean_client(verify, 1)
    node = (node_url, "/v1/inference", None)
    router = (router_url, "/v1/inference", token)
    try:
        for i in range(50):  # warm-up: connections, caches, first-call paths
            for base, path, bearer in (node, router):
                await post(client, base, path, {"prompt": f"warm {i}", "max_tokens": 8}, bearer)
        for block in range(0, n, BLOCK):
            for (base, path, bearer), sink in ((node, direct), (router, routed)):
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                for i in range(block, min(n, block + BLOCK)):
                    body = {"prompt": f"question {i}", "max_tokens": 8}
                    started = time.perf_counter()
                    await post(client, base, path, body, bearer)
                    sink.append((time.perf_counter() - started) * 1000)
                if sink is routed:
                    for name, pid in pids.items():
                        cpu[name] += cpu_seconds(pid) - before[name]
    finally:
        await client.aclose()
    return {"direct": direct, "routed": routed, "cpu_ms": {k: v * 1000 / n for k, v in cpu.items()}}


async def post(client: NodeClient, base: str, path: str, body: dict, bearer: str | None) -> None:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else None
    response = await client.request("POST", base, path, body, headers=headers)
    if response.status_code != 200:
        raise SystemExit(f"HTTP {response.status_code}: {response.content[:300]!r}")


async def throughput(url: str, verify: Any, token: str | None, n: int, concurrency: int) -> float:
    """Requests per second with `concurrency` requests in flight."""
    client = lean_client(verify, concurrency)

    async def worker(counter: Iterator[int]) -> None:
        for i in counter:
            body = {"prompt": f"load {i}", "max_tokens": 8}
            await post(client, url, "/v1/inference", body, token)

    try:
        warm = iter(range(concurrency * 4))  # opens every connection before timing
        await asyncio.gather(*(worker(warm) for _ in range(concurrency)))
        counter = iter(range(n))
        started = time.perf_counter()
        await asyncio.gather(*(worker(counter) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await client.aclose()
    return n / elapsed


def consensus_latency(router_url: str, verify: Any, token: str, n: int) -> list[float]:
    headers = {"Authorization": f"Bearer {token}"}
    times = []
    with httpx.Client(base_url=router_url, verify=verify, headers=headers, timeout=60) as client:
        for i in range(n):
            body = {"prompt": f"c {i}", "max_tokens": 4, "require_consensus": True}
            started = time.perf_counter()
            response = client.post("/v1/inference", json=body)
            times.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise SystemExit(f"consensus HTTP {response.status_code}: {response.text}")
    return times


def zero_quota_refusals(router_url: str, verify: Any, token: str, n: int) -> list[float]:
    """Latency (ms) of consensus requests refused for an empty quota, each a new max_tokens."""
    headers = {"Authorization": f"Bearer {token}"}
    times = []
    with httpx.Client(base_url=router_url, verify=verify, headers=headers, timeout=60) as client:
        client.get("/v1/health")  # the connection, not the refusal, pays the handshake
        for i in range(n):
            body = {"prompt": "q", "max_tokens": 1 + i % 256, "require_consensus": True}
            started = time.perf_counter()
            response = client.post("/v1/inference", json=body)
            times.append((time.perf_counter() - started) * 1000)
            if response.status_code != 403:
                raise SystemExit(f"expected 403, got {response.status_code}: {response.text}")
    return times


def login(router_url: str, verify: Any, username: str) -> str:
    return httpx.post(
        f"{router_url}/v1/auth/token",
        json={"username": username, "password": PASSWORD},
        verify=verify,
    ).json()["access_token"]


@dataclass
class Load:
    """Latencies (ms), wall time and CPU time (of the processes measured) of timed requests."""

    latencies: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    cpu_s: float = 0.0

    def add(self, other: Load) -> None:
        self.latencies += other.latencies
        self.elapsed_s += other.elapsed_s
        self.cpu_s += other.cpu_s


async def sustained(
    urls: list[str],
    verify: Any,
    token: str,
    body: Callable[[int], dict],
    n: int,
    concurrency: int,
    pids: list[int],
) -> Load:
    """`n` requests from `concurrency` clients, request i to ``urls[i % len(urls)]``."""
    client = lean_client(verify, concurrency)
    load = Load()

    async def worker(counter: Iterator[int], sink: list[float]) -> None:
        for i in counter:
            started = time.perf_counter()
            await post(client, urls[i % len(urls)], "/v1/inference", body(i), token)
            sink.append((time.perf_counter() - started) * 1000)

    try:
        warm = iter(range(concurrency * 2 * len(urls)))  # opens every connection first
        await asyncio.gather(*(worker(warm, []) for _ in range(concurrency)))
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        counter = iter(range(n))
        started = time.perf_counter()
        await asyncio.gather(*(worker(counter, load.latencies) for _ in range(concurrency)))
        load.elapsed_s = time.perf_counter() - started
        load.cpu_s = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    finally:
        await client.aclose()
    return load


@dataclass
class Deployment:
    """Router replicas under test: their URLs, process ids and a token for `bench`."""

    name: str
    urls: list[str]
    pids: list[int]
    token: str = ""


def start_routers(
    work: Path, label: str, base: dict[str, Any], database: str, replicas: int, tls: bool
) -> tuple[list[subprocess.Popen], list[str]]:
    """`replicas` router processes on `database`, each with its own port and audit chain."""
    processes, urls = [], []
    for index in range(replicas):
        config = {
            **base,
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "database": {"url": database},
            "audit": {**base["audit"], "path": str(work / f"audit-{label}-{index}.jsonl")},
        }
        path = write_yaml(work / f"router-{label}-{index}.yaml", config)
        processes.append(start(["router", "--config", str(path)], work / f"{label}-{index}.log"))
        urls.append(f"{'https' if tls else 'http'}://127.0.0.1:{config['listen']['port']}")
    return processes, urls


def replicas_postgres(args: argparse.Namespace) -> None:
    """One router on SQLite vs two on one PostgreSQL, alternating blocks; prints the table."""
    tls = not args.no_tls
    work = Path(tempfile.mkdtemp(prefix="fedllm-router-replicas-"))
    node_configs, router_config, verify = setup(work, tls, 2)
    kinds: dict[str, Callable[[int], dict]] = {
        "0-ε answer": lambda i: {"prompt": f"load {i}", "max_tokens": 8},
        "consensus, 1 token (reserve + commit)": lambda i: {
            "prompt": f"c {i}",
            "max_tokens": 1,
            "require_consensus": True,
        },
    }
    results: dict[tuple[str, str], Load] = {}
    with ExitStack() as stack:
        for index, node in enumerate(node_configs):
            log = work / f"node-{index}.log"
            config = write_yaml(work / f"node-{index}.yaml", node)
            process = start(["serve", "--config", str(config)], log)
            stack.callback(stop_process_tree, process)
            wait_ready(f"http://127.0.0.1:{node['port']}", True, process, log)
        postgres = stack.enter_context(running_postgres())
        pg_database = postgres.create_database()
        store = UserStore(pg_database)
        store.add_user("bench", PASSWORD, Role.CLINICIAN, "cardiology")
        store.close()
        deployments = []
        for name, label, database, replicas in (
            ("1 router, SQLite", "sqlite", router_config["database"]["url"], 1),
            ("2 routers, one PostgreSQL", "pg", pg_database, 2),
        ):
            processes, urls = start_routers(work, label, router_config, database, replicas, tls)
            for process in processes:
                stack.callback(stop_process_tree, process)
            for index, (process, url) in enumerate(zip(processes, urls, strict=True)):
                wait_ready(url, verify, process, work / f"{label}-{index}.log")
            deployment = Deployment(name, urls, [process.pid for process in processes])
            deployment.token = login(urls[0], verify, "bench")
            deployments.append(deployment)
        plan = [
            (args.replica_requests, args.concurrency),
            (args.replica_consensus, args.consensus_concurrency),
        ]
        for (kind, body), (count, concurrency) in zip(kinds.items(), plan, strict=True):
            per_round = max(1, count // args.rounds)
            for _ in range(args.rounds):
                for deployment in deployments:
                    load = asyncio.run(
                        sustained(
                            deployment.urls,
                            verify,
                            deployment.token,
                            body,
                            per_round,
                            concurrency,
                            deployment.pids,
                        )
                    )
                    results.setdefault((kind, deployment.name), Load()).add(load)
    shutil.rmtree(work, ignore_errors=True)
    report_replicas(args, tls, results)


def report_replicas(
    args: argparse.Namespace, tls: bool, results: dict[tuple[str, str], Load]
) -> None:
    print(
        f"\nRouter replicas: {args.rounds} alternating rounds, {args.replica_requests} 0-ε "
        f"and {args.replica_consensus} consensus requests timed per setup, "
        f"{args.concurrency} (0-ε) and {args.consensus_concurrency} (consensus) concurrent "
        f"clients, router {'TLS' if tls else 'plain HTTP'}, 2 constant-time nodes; "
        f"{os.cpu_count()} CPU cores shared by client, routers, PostgreSQL and nodes, load "
        f"average {os.getloadavg()[0]:.1f} at the end; Python {platform.python_version()}\n"
    )
    print("| requests | setup | req/s | p50 | p99 | router CPU per request |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (kind, name), load in results.items():
        n = len(load.latencies)
        print(
            f"| {kind} | {name} | {n / load.elapsed_s:.0f} | "
            f"{percentile(load.latencies, 0.5):.1f} ms | {percentile(load.latencies, 0.99):.1f} ms"
            f" | {load.cpu_s * 1000 / n:.2f} ms |"
        )


Send = Callable[[int], Awaitable[None]]


def hop_body(i: int) -> dict[str, Any]:
    """A small inference request, as the router forwards one (a new prompt each time)."""
    return {"prompt": f"hop {i}", "max_tokens": 8}


def _check(status: int, content: bytes) -> None:
    if status != 200:
        raise SystemExit(f"HTTP {status}: {content[:300]!r}")


@asynccontextmanager
async def handwritten_sender(url: str, concurrency: int) -> AsyncIterator[Send]:
    """The router's own client (fedllm/serving/router/http_client.py)."""
    client = lean_client(None, concurrency)

    async def send(i: int) -> None:
        response = await client.request("POST", url, "/v1/inference", hop_body(i))
        _check(response.status_code, response.content)

    try:
        yield send
    finally:
        await client.aclose()


@asynccontextmanager
async def httpx_sender(url: str, concurrency: int) -> AsyncIterator[Send]:
    """httpx.AsyncClient, HTTP/1.1 keep-alive pool sized like the router's."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def send(i: int) -> None:
            response = await client.post("/v1/inference", json=hop_body(i))
            _check(response.status_code, response.content)

        yield send


@asynccontextmanager
async def aiohttp_sender(url: str, concurrency: int) -> AsyncIterator[Send]:
    """aiohttp.ClientSession with a keep-alive connector sized like the router's pool."""
    import aiohttp  # optional: `pip install aiohttp` (the dev extras have it)

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:

        async def send(i: int) -> None:
            async with session.post("/v1/inference", json=hop_body(i)) as response:
                _check(response.status, await response.read())

        yield send


SENDERS: dict[str, Callable[[str, int], AbstractAsyncContextManager[Send]]] = {
    "hand-written (asyncio + httptools)": handwritten_sender,
    "httpx": httpx_sender,
    "aiohttp": aiohttp_sender,
}


async def hop(
    sender: Callable[[str, int], AbstractAsyncContextManager[Send]],
    url: str,
    n: int,
    concurrency: int,
) -> Load:
    """`n` POSTs to the node from `concurrency` tasks; CPU time is this process's (the client's)."""
    load = Load()

    async def worker(counter: Iterator[int], sink: list[float], send: Send) -> None:
        for i in counter:
            started = time.perf_counter()
            await send(i)
            sink.append((time.perf_counter() - started) * 1000)

    async with sender(url, concurrency) as send:
        warm = iter(range(concurrency * 4))
        await asyncio.gather(*(worker(warm, [], send) for _ in range(concurrency)))
        counter = iter(range(n))
        cpu_before = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker(counter, load.latencies, send) for _ in range(concurrency)))
        load.elapsed_s = time.perf_counter() - started
        load.cpu_s = time.process_time() - cpu_before
    return load


def compare_clients(args: argparse.Namespace) -> None:
    """The router → node hop with each client against one node, alternating rounds."""
    senders = dict(SENDERS)
    if importlib.util.find_spec("aiohttp") is None:
        del senders["aiohttp"]
    work = Path(tempfile.mkdtemp(prefix="fedllm-router-clients-"))
    node_configs, _, _ = setup(work, False, 1)
    node = node_configs[0]
    log = work / "node-0.log"
    process = start(["serve", "--config", str(write_yaml(work / "node-0.yaml", node))], log)
    results: dict[str, Load] = {}
    try:
        url = f"http://127.0.0.1:{node['port']}"
        wait_ready(url, True, process, log)
        node_cpu = {name: 0.0 for name in senders}
        per_round = max(1, args.client_requests // args.rounds)
        for _ in range(args.rounds):
            for name, sender in senders.items():
                before = cpu_seconds(process.pid)
                load = asyncio.run(hop(sender, url, per_round, args.concurrency))
                node_cpu[name] += cpu_seconds(process.pid) - before
                results.setdefault(name, Load()).add(load)
    finally:
        stop_process_tree(process)
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nRouter → node hop: POST /v1/inference to one constant-time node (plain HTTP, "
        f"keep-alive), {args.rounds} alternating rounds, {args.client_requests} timed requests "
        f"per client, {args.concurrency} in flight; {os.cpu_count()} CPU cores shared by client "
        f"and node, load average {os.getloadavg()[0]:.1f} at the end; "
        f"Python {platform.python_version()}\n"
    )
    print("| client | req/s | p50 | p99 | client CPU per request | node CPU per request |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, load in results.items():
        n = len(load.latencies)
        print(
            f"| {name} | {n / load.elapsed_s:.0f} | {percentile(load.latencies, 0.5):.2f} ms | "
            f"{percentile(load.latencies, 0.99):.2f} ms | {load.cpu_s * 1000 / n:.3f} ms | "
            f"{node_cpu[name] * 1000 / n:.3f} ms |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--throughput-requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--consensus", type=int, default=0, help="also time N consensus answers")
    parser.add_argument(
        "--zero-quota", type=int, default=0, help="also time N refusals of a user with no quota"
    )
    parser.add_argument("--no-tls", action="store_true", help="plain HTTP to the router")
    parser.add_argument(
        "--replicas-postgres",
        action="store_true",
        help="only compare 1 router on SQLite with 2 replicas on one PostgreSQL",
    )
    parser.add_argument("--replica-requests", type=int, default=2000, help="0-ε answers")
    parser.add_argument("--replica-consensus", type=int, default=200, help="consensus answers")
    parser.add_argument(
        "--consensus-concurrency",
        type=int,
        default=4,
        help="clients sending consensus requests (each node opens one session at a time)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--clients",
        action="store_true",
        help="only compare HTTP clients (hand-written, httpx, aiohttp) on the router → node hop",
    )
    parser.add_argument("--client-requests", type=int, default=6000)
    args = parser.parse_args()
    if args.clients:
        compare_clients(args)
        return
    if args.replicas_postgres:
        replicas_postgres(args)
        return

    work = Path(tempfile.mkdtemp(prefix="fedllm-router-bench-"))
    nodes = 2 if args.consensus or args.zero_quota else 1
    node_configs, router_config, verify = setup(work, not args.no_tls, nodes)
    processes = []
    try:
        for index, node in enumerate(node_configs):
            log = work / f"node-{index}.log"
            config = write_yaml(work / f"node-{index}.yaml", node)
            processes.append(start(["serve", "--config", str(config)], log))
            wait_ready(f"http://127.0.0.1:{node['port']}", True, processes[-1], log)
        log = work / "router.log"
        config = write_yaml(work / "router.yaml", router_config)
        processes.append(start(["router", "--config", str(config)], log))
        scheme = "http" if args.no_tls else "https"
        router_url = f"{scheme}://127.0.0.1:{router_config['listen']['port']}"
        node_url = f"http://127.0.0.1:{node_configs[0]['port']}"
        wait_ready(router_url, verify, processes[-1], log)
        token = login(router_url, verify, "bench")

        pids = {"router": processes[-1].pid, "node": processes[0].pid}
        latencies = asyncio.run(
            sequential(router_url, node_url, verify, token, args.requests, pids)
        )
        direct_rps = asyncio.run(
            throughput(node_url, True, None, args.throughput_requests, args.concurrency)
        )
        routed_rps = asyncio.run(
            throughput(router_url, verify, token, args.throughput_requests, args.concurrency)
        )
        consensus = (
            consensus_latency(router_url, verify, token, args.consensus) if args.consensus else []
        )
        refusals = (
            zero_quota_refusals(router_url, verify, login(router_url, verify, "broke"), n)
            if (n := args.zero_quota)
            else []
        )
    finally:
        for process in reversed(processes):
            stop_process_tree(process)
    report(args, latencies, direct_rps, routed_rps, consensus, refusals)
    shutil.rmtree(work, ignore_errors=True)


def report(
    args, latencies: dict, direct_rps: float, routed_rps: float, consensus, refusals
) -> None:
    direct, routed = latencies["direct"], latencies["routed"]
    rows = []
    for label, q in (("p50", 0.50), ("p99", 0.99)):
        d, r = percentile(direct, q), percentile(routed, q)
        goal = GOALS[f"{label}_ms"]
        rows.append((f"added latency {label}", f"{r - d:.2f} ms", f"<= {goal:g} ms", r - d <= goal))
        rows.append((f"  direct {label} / via router {label}", f"{d:.2f} / {r:.2f} ms", "", None))
    rows.append(
        (
            f"throughput via router (c={args.concurrency})",
            f"{routed_rps:.0f} req/s",
            f">= {GOALS['throughput']:g} req/s",
            routed_rps >= GOALS["throughput"],
        )
    )
    rows.append(("  throughput straight to node", f"{direct_rps:.0f} req/s", "", None))
    cpu = latencies["cpu_ms"]
    rows.append(
        (
            "router CPU per forwarded request",
            f"{cpu['router']:.2f} ms (≈ {1000 / max(cpu['router'], 1e-9):.0f} req/s per core)",
            "",
            None,
        )
    )
    rows.append(("  node CPU per request", f"{cpu['node']:.2f} ms", "", None))
    if consensus:
        rows.append(
            (
                "consensus answer (2 nodes, 4 tokens) p50",
                f"{statistics.median(consensus):.1f} ms",
                "",
                None,
            )
        )
    if refusals:
        p99 = percentile(refusals, 0.99)
        goal = GOALS["refusal_p99_ms"]
        rows.append(
            (
                f"zero-quota consensus refusal p99 ({len(refusals)} requests, new max_tokens each)",
                f"{p99:.2f} ms (p50 {percentile(refusals, 0.5):.2f} ms)",
                f"<= {goal:g} ms",
                p99 <= goal,
            )
        )
    tls = "plain HTTP" if args.no_tls else "TLS"
    print(
        f"\nRouter overhead: {args.requests} sequential /v1/inference requests each way "
        f"(router: {tls}, JWT auth, rate limit, budget lookup, metrics; cache off), "
        f"{args.throughput_requests} concurrent; {os.cpu_count()} CPU cores shared by client, "
        f"router and node; Python {platform.python_version()}\n"
    )
    print("| measure | result | goal | met |")
    print("| --- | --- | --- | --- |")
    for measure, result, goal, met in rows:
        flag = "" if met is None else ("yes" if met else "no")
        print(f"| {measure} | {result} | {goal} | {flag} |")


if __name__ == "__main__":
    main()
