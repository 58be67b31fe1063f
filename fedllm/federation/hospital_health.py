"""What hospital IT sees running on its own machine: SuperNode, warm worker, inference server.

Everything is asked on loopback, with no certificate: the SuperNode's local API
(``runtime.clientapp_port``, Flower's ``GET /health``), the warm worker's status file (its
process alive, the file fresh, not stuck waiting for the SuperNode), and the
inference server's plain-HTTP probe port (``inference.probe_port``, ``GET /v1/ready``), which
answers whether the server is ready and why not, nothing else. The inference server's main port
may demand the router's client certificate, which hospital IT does not hold, so the probe port
is the one a local check (``fedllm hospital health``) and ``fedllm hospital start``'s banner
use.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from fedllm.federation.hospital_config import HospitalConfig
from fedllm.federation.worker_state import STATUS_STALE_S, read_status, worker_status_path

LOOPBACK = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")


@dataclass(frozen=True)
class PartHealth:
    """One process of the hospital: ``ok`` when it answers (and, for the server, is ready)."""

    name: str
    ok: bool
    state: str
    detail: str


def _local(host: str) -> str:
    """Where this machine reaches a server bound to ``host``: a wildcard on loopback."""
    return LOOPBACK if host in ("0.0.0.0", "::", "") else host


def probe_url(config: HospitalConfig) -> str | None:
    """The inference server's plain readiness probe, or None without ``inference.probe_port``."""
    inference = config.inference
    if inference is None or inference.probe_port is None:
        return None
    return f"http://{_local(inference.host)}:{inference.probe_port}/v1/ready"


def inference_health(config: HospitalConfig, timeout_s: float = PROBE_TIMEOUT_S) -> PartHealth:
    """Ask the probe port: ready, answering but not ready (and why), or not answering."""
    url = probe_url(config)
    if url is None:
        return PartHealth(
            "inference server", False, "not checked", "set inference.probe_port to check it"
        )
    try:
        answer = httpx.get(url, timeout=timeout_s)
        body = answer.json()
    except (httpx.HTTPError, ValueError) as error:
        return PartHealth("inference server", False, "not answering", f"{url}: {error!r}")
    if answer.status_code == 200 and body.get("ready") is True:
        return PartHealth("inference server", True, "ready", url)
    problems = "; ".join(str(p) for p in body.get("problems", [])) or f"HTTP {answer.status_code}"
    return PartHealth("inference server", False, "answering, not ready", problems)


def wait_for_inference(
    config: HospitalConfig, timeout_s: float, alive: Callable[[], bool]
) -> PartHealth:
    """Poll the probe until the server answers (ready or not), it exits, or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = inference_health(config)
        if health.state != "not answering" or time.monotonic() >= deadline or not alive():
            return health
        time.sleep(0.5)


def supernode_health(config: HospitalConfig, timeout_s: float = PROBE_TIMEOUT_S) -> PartHealth:
    """The SuperNode's local API, and the node id it last logged on activation."""
    url = f"http://{LOOPBACK}:{config.runtime.clientapp_port}/health"
    log_path = config.runtime.state_dir / "supernode.log"
    node_ids = _NODE_ID.findall(log_path.read_text(errors="replace")) if log_path.is_file() else []
    activation = f"node id {node_ids[-1]}" if node_ids else "not activated yet (no node id logged)"
    try:
        answering = httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        answering = False
    if not answering:
        return PartHealth("SuperNode", False, "not running", f"nothing answers {url}; {log_path}")
    return PartHealth("SuperNode", bool(node_ids), "running", f"{activation}; {log_path}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another account's process of that id: alive
    return True


def worker_health(config: HospitalConfig) -> PartHealth:
    """Whether the warm worker runs and claims the SuperNode's tasks, from its status file."""
    path = worker_status_path(config.runtime.state_dir)
    status = read_status(config.runtime.state_dir)
    if status is None:
        return PartHealth("worker", False, "not running", f"no status in {path}")
    if status["state"] == "stopped" or not _alive(int(status["pid"])):
        return PartHealth("worker", False, "not running", f"process {status['pid']} is gone")
    now = time.time()
    detail = f"process {status['pid']}, {status['tasks']} tasks run"
    if now - float(status["updated"]) > STATUS_STALE_S:
        age = now - float(status["updated"])
        return PartHealth("worker", False, "not answering", f"{detail}; no status for {age:.0f} s")
    if status["state"] == "polling" and now - float(status["since"]) > STATUS_STALE_S:
        waited = now - float(status["since"])
        return PartHealth(
            "worker",
            False,
            "waiting for the SuperNode",
            f"{detail}; its Runtime API has not answered for {waited:.0f} s",
        )
    return PartHealth("worker", True, status["state"], detail)


def hospital_health(config: HospitalConfig) -> list[PartHealth]:
    """Every part ``fedllm hospital start`` runs for this configuration."""
    parts = [supernode_health(config)]
    if config.runtime.warm_worker:
        parts.append(worker_health(config))
    if config.inference is not None:
        parts.append(inference_health(config))
    return parts
