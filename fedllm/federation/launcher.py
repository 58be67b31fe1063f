"""Start a private Flower SuperLink in simulation mode, run the app on it, and stop it again.

``fedllm run`` uses Flower's own runtime (``flower-superlink --simulation`` plus ``flwr run``),
not a re-implementation, but isolates it: free loopback ports, a ``FLWR_HOME`` inside the
run directory and runtime dependency installation switched off (the environment is already
complete), so concurrent runs and the user's own Flower setup never interfere, and nothing
keeps running after the run ends, whether it succeeded, failed or was interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import httpx
import psutil
import structlog

log = structlog.get_logger(__name__)

CONNECTION_NAME = "fedllm-local"
STARTUP_TIMEOUT_S = 60.0


class FederationError(RuntimeError):
    """The local Flower runtime could not be started or the run did not complete."""


@dataclass(frozen=True)
class SimulationResources:
    """How many simulated hospitals exist and what each ClientApp may use."""

    num_supernodes: int
    cpus_per_client: int = 1
    gpus_per_client: int = 0


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: our venv's tools first, our private FLWR_HOME."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    return env


@contextmanager
def local_superlink(flwr_home: Path, log_path: Path) -> Iterator[str]:
    """A SuperLink in simulation mode for the duration of the block; yields its address."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
        f'[superlink.{CONNECTION_NAME}]\naddress = "{address}"\ninsecure = true\n',
        encoding="utf-8",
    )
    command = [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--control-api-address",
        f"127.0.0.1:{free_port()}",
        "--fleet-api-address",
        f"127.0.0.1:{free_port()}",
        "--health-server-address",
        f"127.0.0.1:{free_port()}",
        "--database",
        str(flwr_home / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            env=flower_environment(flwr_home),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}/health", log_path)
        yield address
    finally:
        stop_process_tree(process)


def run_app(
    app_dir: Path,
    flwr_home: Path,
    run_config: Mapping[str, str],
    resources: SimulationResources | None,
    log_path: Path,
    connection: str = CONNECTION_NAME,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """``flwr run`` the app on the SuperLink ``connection`` of ``flwr_home``; block until it ends.

    ``resources`` sizes a simulation; a deployed SuperLink (``None``) has real SuperNodes.
    Every line ``flwr run --stream`` prints (the ServerApp's log, streamed from the SuperLink)
    goes to ``log_path`` and, as text, to ``on_line``: the run's one progress stream.
    """
    command = ["flwr", "run", str(app_dir), connection, "--stream"]
    if resources is not None:
        command += [
            "--federation-config",
            f"num-supernodes={resources.num_supernodes} "
            f"client-resources-num-cpus={resources.cpus_per_client} "
            f"client-resources-num-gpus={resources.gpus_per_client}",
        ]
    for key, value in run_config.items():
        command += ["--run-config", f"{key}={run_config_value(value)}"]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command,
            env=flower_environment(flwr_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        pump = threading.Thread(
            target=_copy_lines,
            args=(process.stdout, log_file, on_line),
            name="flwr-run-output",
            daemon=True,
        )
        pump.start()
        try:
            code = process.wait()
        finally:
            # `flwr run --stream` only follows the run's log: no reason to give it long
            stop_process_tree(process, grace_s=1.0)
            pump.join(timeout=5.0)
    if code != 0:
        raise FederationError(f"`flwr run` exited with code {code}; see {log_path}")


def run_config_value(value: object) -> str:
    """A ``--run-config`` value as Flower's parser reads it: a string in single quotes verbatim.

    Its pattern takes ``'...'`` or ``"..."`` with no quote of the same kind inside, so a JSON
    value (full of ``"``) travels in single quotes; a string holding ``'`` falls back to JSON.
    """
    if isinstance(value, str) and "'" not in value and "\n" not in value:
        return f"'{value}'"
    return json.dumps(value)


def _copy_lines(
    output: IO[bytes], log_file: BinaryIO, on_line: Callable[[str], None] | None
) -> None:
    """Copy a process's output into its log, line by line, handing each line to ``on_line``.

    The copy goes on to the end whatever ``on_line`` does: a pipe nobody reads would stall
    ``flwr run``, and with it the run, over a display problem.
    """
    for line in output:
        log_file.write(line)
        log_file.flush()
        if on_line is None:
            continue
        try:
            on_line(line.decode("utf-8", errors="replace"))
        except Exception:
            log.warning("flwr_run.progress_lost", exc_info=True)
            on_line = None


def stop_process_tree(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Terminate a process and everything it started, however it detached.

    Flower's SuperExec starts the ServerApp and the simulation runtime in sessions of their
    own, and Ray's daemons hang below those, so signalling the process group is not enough:
    the whole tree of descendants is collected first (before parents die and orphans are
    re-parented), asked to terminate, and killed after ``grace_s``. A process that already died
    (``kill -9``) has no descendants left to find, but its orphans (a SuperNode's
    ``flwr-clientapp``, retrying for minutes) are still in its process group: those are
    collected too, with their descendants.
    """
    tree: dict[int, psutil.Process] = {}
    roots = [*_living([process.pid]), *_group_members(process.pid)]
    for root in roots:
        tree[root.pid] = root
        with suppress(psutil.Error):
            tree.update((child.pid, child) for child in root.children(recursive=True))
    tree.pop(os.getpid(), None)
    for member in tree.values():
        with suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(list(tree.values()), timeout=grace_s)
    for member in alive:
        with suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    process.wait()


def _living(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        with suppress(psutil.Error):
            found.append(psutil.Process(pid))
    return found


def _group_members(group: int) -> list[psutil.Process]:
    """Every process still in process group `group` (the group a new session's leader made)."""
    members = []
    for candidate in psutil.process_iter():
        with suppress(psutil.Error, OSError):
            if candidate.pid != os.getpid() and os.getpgid(candidate.pid) == group:
                members.append(candidate)
    return members


def wait_until_healthy(
    process: subprocess.Popen[bytes],
    url: str,
    log_path: Path,
    *,
    verify: bool | str = True,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> None:
    """Poll a SuperLink's ``/health`` at ``url`` until it answers.

    ``verify`` is httpx's: the consortium CA file for a TLS SuperLink. Raises FederationError
    naming the log if the process exits first or the SuperLink never answers.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(
                f"flower-superlink exited with code {process.returncode}; see {log_path}"
            )
        try:
            if httpx.get(url, verify=verify, timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise FederationError(f"flower-superlink did not become healthy at {url}; see {log_path}")
