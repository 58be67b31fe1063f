"""Authenticated request latency through the router, alone and during an authentication flood.

A ConstantBackend node (`fedllm serve`, no ledger) and a TLS router (`fedllm router`, the
shipped login limits and hashing pool) run as separate processes, as in router_overhead.py.
One clinician sends sequential plain (0 ε) /v1/inference requests; p50/p99 are measured first
with nothing else going on, then while a separate flood process sends wrong logins (random
unknown usernames, from 40 loopback addresses) and requests with bad bearer tokens (garbage
and well-formed JWTs signed with another key) as fast as it can. Run:

    .venv/bin/python benchmarks/auth_flood.py [--requests 1000] [--flood-concurrency 64]
        [--flood-nice 0]

``--flood-nice N`` runs the flood process at nice N, standing in for attackers whose CPUs are
not the router host's (with 0 the flood competes with the router for the same cores).

Goal: p99 of the authenticated requests during the flood under 50 ms. On a small machine the
client, the flood, the router and the node share the cores: say so when quoting the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from router_overhead import free_port, lean_client, percentile, start, wait_ready, write_yaml

from fedllm.federation.launcher import stop_process_tree
from fedllm.security.certs import init_credentials
from fedllm.security.tokens import TokenIssuer, generate_ed25519_keypair
from fedllm.security.users import Role, User, UserStore

PASSWORD = "benchmark password, not a secret"
GOAL_P99_MS = 50.0
FLOOD_ADDRESSES = 40


def setup(work: Path) -> tuple[dict, dict, ssl.SSLContext]:
    """Node config, router config (TLS, shipped login limits) and the CA context."""
    node = {
        "node_id": "flood-node",
        "hospital_id": "flood-hospital",
        "port": free_port(),
        "backend": "constant",
    }
    creds = init_credentials(work / "credentials", hospitals=["flood"])
    database = f"sqlite:///{work / 'router.db'}"
    store = UserStore(database)
    store.add_user("clinician", PASSWORD, Role.CLINICIAN, "cardiology")
    store.close()
    router: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "tls": {"cert_file": str(creds.router_cert), "key_file": str(creds.router_key)},
        "database": {"url": database},
        "auth": {"signing_key_file": str(creds.jwt_private_key)},
        # The measured user's own bucket is not what is under test; logins keep the defaults.
        "rate_limit": {"requests_per_s": 1e6, "burst": 1_000_000},
        "nodes": [{"node_id": node["node_id"], "url": f"http://127.0.0.1:{node['port']}"}],
        "cache": {"max_entries": 0},
        "audit": {"path": str(work / "audit.jsonl"), "redaction_key_file": str(creds.audit_key)},
    }
    return node, router, ssl.create_default_context(cafile=str(creds.ca_cert))


async def measure(url: str, verify: ssl.SSLContext, token: str, n: int) -> list[float]:
    """Latency (ms) of `n` sequential authenticated plain requests, after a warm-up."""
    client = lean_client(verify, 1)
    headers = {"Authorization": f"Bearer {token}"}
    times = []
    try:
        for i in range(-50, n):
            body = {"prompt": f"question {i}", "max_tokens": 8}
            started = time.perf_counter()
            response = await client.request("POST", url, "/v1/inference", body, headers=headers)
            if response.status_code != 200:
                raise SystemExit(f"HTTP {response.status_code}: {response.content[:300]!r}")
            if i >= 0:
                times.append((time.perf_counter() - started) * 1000)
    finally:
        await client.aclose()
    return times


async def flood(url: str, ca_file: str, stop: Path, concurrency: int) -> dict[str, Any]:
    """Bad logins and bad tokens until the file `stop` appears; counts of (kind, status).

    A second after the first requests go out (connections open, the hashing queue full),
    the file ``<stop>.ready`` is created: the measurement starts then.
    """
    context = ssl.create_default_context(cafile=ca_file)
    clients = [
        httpx.AsyncClient(
            base_url=url,
            timeout=60,
            transport=httpx.AsyncHTTPTransport(verify=context, local_address=f"127.0.0.{2 + n}"),
        )
        for n in range(FLOOD_ADDRESSES)
    ]
    foreign, _ = generate_ed25519_keypair()
    forged = TokenIssuer(foreign, issuer="fedllm-router", audience="fedllm").issue(
        User(username="mallory", role=Role.ADMIN, department="it")
    )
    counts: Counter[str] = Counter()
    started = time.monotonic()

    async def worker(index: int) -> None:
        client = clients[index % FLOOD_ADDRESSES]
        n = 0
        while not stop.exists():
            n += 1
            if n % 2:
                name = f"nobody-{secrets.token_hex(4)}"
                response = await client.post(
                    "/v1/auth/token", json={"username": name, "password": "guess"}
                )
                counts[f"login {response.status_code}"] += 1
            else:
                token = forged if n % 4 else f"garbage.{secrets.token_hex(8)}.x"
                response = await client.post(
                    "/v1/inference",
                    json={"prompt": "x", "max_tokens": 1},
                    headers={"Authorization": f"Bearer {token}"},
                )
                counts[f"bad token {response.status_code}"] += 1

    async def announce() -> None:
        await asyncio.sleep(1.0)
        stop.with_suffix(".ready").touch()

    try:
        await asyncio.gather(announce(), *(worker(i) for i in range(concurrency)))
    finally:
        for client in clients:
            await client.aclose()
    return {"counts": dict(counts), "seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--flood-concurrency", type=int, default=64)
    parser.add_argument("--flood-nice", type=int, default=0, help="nice value of the flood")
    parser.add_argument(
        "--flood-worker", nargs=3, metavar=("URL", "CA", "STOP_FILE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.flood_worker:
        url, ca_file, stop = args.flood_worker
        print(json.dumps(asyncio.run(flood(url, ca_file, Path(stop), args.flood_concurrency))))
        return

    work = Path(tempfile.mkdtemp(prefix="fedllm-auth-flood-"))
    node, router, verify = setup(work)
    stop = work / "stop-flood"  # the flood process runs until this file exists
    processes = []
    try:
        log = work / "node.log"
        processes.append(
            start(["serve", "--config", str(write_yaml(work / "node.yaml", node))], log)
        )
        wait_ready(f"http://127.0.0.1:{node['port']}", True, processes[-1], log)
        log = work / "router.log"
        processes.append(
            start(["router", "--config", str(write_yaml(work / "router.yaml", router))], log)
        )
        url = f"https://127.0.0.1:{router['listen']['port']}"
        wait_ready(url, verify, processes[-1], log)
        token = httpx.post(
            f"{url}/v1/auth/token",
            json={"username": "clinician", "password": PASSWORD},
            verify=verify,
        ).json()["access_token"]

        alone = asyncio.run(measure(url, verify, token, args.requests))
        audit_before = len((work / "audit.jsonl").read_text().splitlines())
        flooder = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--flood-worker",
                url,
                str(work / "credentials" / "ca" / "ca.crt"),
                str(stop),
                "--flood-concurrency",
                str(args.flood_concurrency),
            ],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: os.nice(args.flood_nice)) if args.flood_nice else None,
        )
        deadline = time.monotonic() + 120
        while not stop.with_suffix(".ready").exists():
            if flooder.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the flood process did not start")
            time.sleep(0.1)
        during = asyncio.run(measure(url, verify, token, args.requests))
        stop.touch()
        flooded = json.loads(flooder.communicate(timeout=120)[0])
    finally:
        stop.touch()
        for process in reversed(processes):
            stop_process_tree(process)
    audit_lines = len((work / "audit.jsonl").read_text().splitlines()) - audit_before
    report(args, alone, during, flooded["counts"], audit_lines, flooded["seconds"])
    shutil.rmtree(work, ignore_errors=True)


def report(
    args, alone: list[float], during: list[float], counts: dict, audit: int, seconds: float
) -> None:
    print(
        f"\nAuth flood: {args.requests} sequential authenticated plain /v1/inference requests "
        f"(TLS, cache off) alone, then during {seconds:.0f} s of bad logins + bad tokens from "
        f"{FLOOD_ADDRESSES} addresses ({args.flood_concurrency} in flight, nice "
        f"{args.flood_nice}); {os.cpu_count()} CPU cores shared by client, flood, router and "
        f"node; load average {os.getloadavg()[0]:.1f} at the end; Python "
        f"{platform.python_version()}\n"
    )
    print("| authenticated plain request | alone | during the flood | goal | met |")
    print("| --- | --- | --- | --- | --- |")
    for label, q in (("p50", 0.50), ("p99", 0.99)):
        a, d = percentile(alone, q), percentile(during, q)
        goal = f"< {GOAL_P99_MS:g} ms" if label == "p99" else ""
        met = ("yes" if d < GOAL_P99_MS else "no") if label == "p99" else ""
        print(f"| {label} | {a:.2f} ms | {d:.2f} ms | {goal} | {met} |")
    total = sum(counts.values())
    detail = ", ".join(f"{key}: {value}" for key, value in sorted(counts.items()))
    print(f"\nFlood: {total} requests ({total / seconds:.0f}/s): {detail}.")
    print(f"Audit entries written during the flood (failures are counted, not logged): {audit}.")


if __name__ == "__main__":
    main()
