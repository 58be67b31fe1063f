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

Goals: added p50 <= 2 ms, added p99 <= 10 ms, >= 1000 req/s through the router, and a consensus
request from a user with no quota left refused (403) in <= 10 ms p99, whatever its max_tokens
(``--zero-quota N`` sends N such requests, each with a max_tokens not asked before, so no cost is
served from a cache). On a small machine the client, router and node share the cores: say so
when quoting the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

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
    args = parser.parse_args()

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
