"""``fedllm hospital``: what a hospital's IT runs to join the federation.

``fedllm hospital start --config hospital.yaml`` starts the hospital's Flower SuperNode (TLS,
SuperNode authentication, the hospital's own data and privacy ledger), the long-lived worker
that runs the SuperNode's tasks with the base model kept loaded across rounds
(``runtime.warm_worker``, on by default; also ``fedllm hospital worker``) and, when configured,
its inference server, and stops them all, with one line saying which stopped, when one stops,
or on Ctrl-C / SIGTERM.
``fedllm hospital check`` validates the file, the records' columns and the secret files' modes
and shows what would run, writing nothing (``--online`` also reaches the SuperLink over TLS).
``fedllm hospital status`` shows ε spent and left, the ledger's history, the base-model hash and
the adapter being served, from the hospital's own files. ``fedllm hospital health`` asks, on this
machine and with no certificate, whether each process ``start`` runs answers. Everything
``start`` creates (state directory, logs, ledger) is private to the account running it
(0700/0600).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedllm.cli.common import console, error_console, fail, print_json
from fedllm.config.loading import ConfigError
from fedllm.federation.deployment import (
    INSECURE_WARNING,
    DeploymentError,
    data_summary,
    hospital_node_config,
    hospital_supernode_command,
    key_mode_problems,
    missing_hospital_files,
    runtime_api_address,
    superlink_handshake,
    write_inference_config,
)
from fedllm.federation.hospital_config import HospitalConfig, load_hospital_config
from fedllm.federation.hospital_health import hospital_health, wait_for_inference
from fedllm.federation.hospital_status import hospital_status
from fedllm.federation.launcher import stop_process_tree
from fedllm.federation.processes import (
    log_tail,
    sigterm_as_interrupt,
    start_process,
    wait_for_first_exit,
)
from fedllm.federation.worker_state import WorkerError, read_status, superexec_secret_path
from fedllm.security.environment import keyring_from_environment
from fedllm.storage.database import sqlite_path
from fedllm.storage.files import create_private_file, private_directory, use_private_umask

hospital_app = typer.Typer(
    name="hospital",
    help="Run this hospital's part of the federation (Flower SuperNode, inference server).",
    no_args_is_help=True,
)

ConfigOption = Annotated[
    Path, typer.Option("--config", help="The hospital's YAML, e.g. configs/hospital.yaml")
]

WORKER_COMMAND = [sys.executable, "-m", "fedllm.cli", "hospital", "worker"]
# How long `start` waits for the inference server to answer its probe before saying so.
INFERENCE_READY_TIMEOUT_S = 180.0
# How long `start` waits for the worker to poll the SuperNode (it imports PyTorch first).
WORKER_START_TIMEOUT_S = 120.0

NOT_REGISTERED_HINT = (
    "The SuperLink refused this SuperNode's key. Send the public key ({public_key}) to the "
    "federation operator, who registers it with `fedllm superlink register`."
)


def _load(path: Path) -> HospitalConfig:
    try:
        config = load_hospital_config(path)
    except ConfigError as error:
        fail(str(error))
    missing = missing_hospital_files(config)
    if missing:
        fail(f"{path}: missing files\n  " + "\n  ".join(missing))
    return config


@hospital_app.command("check")
def check_command(
    config: ConfigOption,
    json_output: bool = typer.Option(False, "--json"),
    online: bool = typer.Option(
        False, "--online", help="Also reach the SuperLink: TCP and a TLS handshake against the CA"
    ),
) -> None:
    """Validate hospital.yaml, the records file and key modes; print the SuperNode command.

    Writes nothing and starts nothing.
    """
    from fedllm.data import DataError

    hospital = _load(config)
    problems = key_mode_problems(hospital)
    try:
        records = data_summary(hospital)
    except DataError as error:
        problems.append(f"data: {str(error).splitlines()[0]}")
        records = None
    try:
        command = hospital_supernode_command(hospital, write_config=False)
        superlink = superlink_handshake(hospital) if online else None
    except DeploymentError as error:
        problems.append(str(error))
        command, superlink = [], None
    if problems:
        fail(f"{config}: " + ("\n  ".join(["", *problems]) if len(problems) > 1 else problems[0]))
    summary = {
        "hospital": hospital.hospital,
        "records": records,
        "supernode": command,
        "node_config": hospital_node_config(hospital),
        "inference_server": hospital.inference is not None,
        "superlink": superlink,
    }
    if json_output:
        print_json(summary)
        return
    console.print(
        f"[green]ok[/] {config}: hospital [bold]{hospital.hospital}[/], {records} records in "
        f"{hospital.data.path}",
        highlight=False,
    )
    if superlink is not None:
        console.print(f"[green]ok[/] SuperLink: {superlink}", highlight=False)
    console.print("SuperNode: " + " ".join(command), highlight=False, soft_wrap=True)


@hospital_app.command("status")
def status_command(config: ConfigOption, json_output: bool = typer.Option(False, "--json")) -> None:
    """ε spent and remaining, the ledger's events, the base-model hash, the served adapter."""
    try:
        hospital = load_hospital_config(config)
    except ConfigError as error:
        fail(str(error))
    try:
        status = hospital_status(hospital, keyring=keyring_from_environment())
    except Exception as error:  # a ledger or key ring problem: one line, not a traceback
        fail(f"{config}: {type(error).__name__}: {str(error).splitlines()[0]}")
    if json_output:
        print_json(status)
        return
    _show_status(status)


def _show_status(status: dict) -> None:
    privacy = status["privacy"]
    cap = privacy["epsilon_cap"]
    remaining = privacy["remaining_epsilon"]
    console.print(f"hospital [bold]{status['hospital']}[/]", highlight=False)
    console.print(
        f"ε spent {privacy['spent_epsilon']:.4g}"
        + (f" of cap {cap:g}, remaining {remaining:.4g}" if cap is not None else " (no cap set)")
        + (f" at δ={privacy['delta']:g}" if privacy["delta"] is not None else "")
        + f"; ledger {privacy['ledger_url']}",
        highlight=False,
    )
    table = Table("recorded at (UTC)", "run", "round", "event", "ε after")
    for row in privacy["events"]:
        table.add_row(
            row["recorded_at"],
            row["run_id"],
            str(row["round_id"]),
            str(row["event"].get("kind")),
            f"{row['epsilon_after']:.4g}",
        )
    if privacy["events"]:
        console.print(table)
    else:
        console.print("no events recorded yet")
    model = status["base_model"]
    if model is not None:
        console.print(
            f"base model {model.get('name')!r}: "
            + (f"sha256 {model['sha256']}" if "sha256" in model else f"error: {model['error']}"),
            highlight=False,
        )
    adapter = status["adapter"]
    if adapter is not None:
        line = f"adapter in {adapter['adapter_dir']}: "
        if adapter["version"] is None:
            line += adapter["refusal"]
        else:
            dp = adapter["dp"]
            line += (
                f"version {adapter['version']} from run {adapter['run_id']}, "
                f"max ε {dp['max_epsilon']} at δ={dp['delta']}"
                + (f"; NOT servable: {adapter['refusal']}" if adapter["refusal"] else "")
            )
        console.print(line, highlight=False)


@hospital_app.command("start")
def start_command(config: ConfigOption) -> None:
    """Start the SuperNode (and the inference server when configured) until Ctrl-C."""
    hospital = _load(config)
    if hospital.superlink.insecure:
        error_console.print(f"[bold red]WARNING: {INSECURE_WARNING}[/]", highlight=False)
    state = prepare_private_state(hospital)
    try:
        supernode_command = hospital_supernode_command(hospital)
    except DeploymentError as error:
        fail(str(error))
    logs = {name: state / f"{name}.log" for name in ("worker", "supernode", "inference")}
    processes = {}
    with sigterm_as_interrupt():
        try:
            processes["supernode"] = start_process(
                supernode_command, state / "flwr", logs["supernode"]
            )
            if hospital.runtime.warm_worker:
                worker = [*WORKER_COMMAND, "--config", str(config)]
                processes["worker"] = start_process(worker, state / "flwr", logs["worker"])
                _wait_for_worker(hospital, processes["worker"])
            node_yaml = write_inference_config(hospital)
            if node_yaml is not None:
                serve = [sys.executable, "-m", "fedllm.cli", "serve", "--config", str(node_yaml)]
                processes["inference"] = start_process(serve, state / "flwr", logs["inference"])
            console.print(
                f"hospital [bold]{hospital.hospital}[/]: SuperNode → {hospital.superlink.address}"
                + (", warm worker" if "worker" in processes else "")
                + f"; logs in {state}. Ctrl-C stops.",
                highlight=False,
            )
            if "inference" in processes:
                _announce_inference(hospital, processes, logs["inference"])
            name, code = wait_for_first_exit(processes)
        except KeyboardInterrupt:
            console.print("stopping ...")
            return
        except WorkerError as error:
            fail(f"{error}; see {logs['worker']}")
        finally:
            for process in reversed(processes.values()):
                stop_process_tree(process)
    if name == "worker":
        # the SuperNode would queue tasks nobody runs: the hospital stops, saying so in a line
        fail(
            f"the worker stopped ({_exit_reason(code)}), so the hospital stopped; see {logs[name]}"
        )
    tail = log_tail(logs[name])
    hint = ""
    if name == "supernode" and "activate SuperNode" in tail and hospital.auth:
        hint = "\n" + NOT_REGISTERED_HINT.format(public_key=hospital.auth.public_key or "*.pub")
    fail(f"the {name} stopped (exit code {code}); see {logs[name]}\n{tail}{hint}")


def _exit_reason(code: int) -> str:
    """``exit code N``, or the signal that killed the process."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _announce_inference(
    hospital: HospitalConfig, processes: dict[str, subprocess.Popen[bytes]], log_path: Path
) -> None:
    """Name the inference server's address once it answers its local probe, not before."""
    if hospital.inference is None:
        return
    where = f"{hospital.inference.host}:{hospital.inference.port}"
    health = wait_for_inference(
        hospital,
        INFERENCE_READY_TIMEOUT_S,
        lambda: all(p.poll() is None for p in processes.values()),
    )
    if health.state == "not checked":
        console.print(f"inference server started on {where}; {health.detail}", highlight=False)
    elif health.state == "not answering":
        if all(p.poll() is None for p in processes.values()):
            console.print(
                f"inference server not ready after {INFERENCE_READY_TIMEOUT_S:g} s, see {log_path}",
                highlight=False,
            )
    else:
        console.print(
            f"inference server on {where}: {health.state}"
            + ("" if health.ok else f" ({health.detail})"),
            highlight=False,
        )


@hospital_app.command("health")
def health_command(config: ConfigOption, json_output: bool = typer.Option(False, "--json")) -> None:
    """Is each process `start` runs answering? Asked on this machine, no certificate needed.

    The SuperNode on its local API, the warm worker on its socket, the inference server on its
    plain probe port (``inference.probe_port``). Exits 1 when any part is down or not ready.
    """
    parts = hospital_health(_load(config))
    if json_output:
        print_json([asdict(part) for part in parts])
    else:
        table = Table("part", "state", "detail")
        for part in parts:
            colour = "green" if part.ok else "red"
            table.add_row(part.name, f"[{colour}]{part.state}[/]", part.detail)
        console.print(table)
    if not all(part.ok for part in parts):
        raise typer.Exit(1)


def _wait_for_worker(hospital: HospitalConfig, process: subprocess.Popen[bytes]) -> None:
    """Return once the worker polls the SuperNode; `WorkerError` when it exits or is late."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise WorkerError(f"the worker stopped before it served ({_exit_reason(code)})")
        status = read_status(hospital.runtime.state_dir)
        if status is not None and status["pid"] == process.pid and status["state"] != "starting":
            return
        time.sleep(0.2)
    raise WorkerError(f"the worker did not start within {WORKER_START_TIMEOUT_S:g} s")


@hospital_app.command("worker")
def worker_command(config: ConfigOption) -> None:
    """Run this hospital's SuperNode tasks in one process that keeps the model loaded.

    Claims every ClientApp task from the SuperNode's Runtime API (127.0.0.1,
    ``runtime.clientapp_port``) until Ctrl-C / SIGTERM; ``fedllm hospital start`` runs it for
    you when ``runtime.warm_worker`` is on (and the SuperNode in process isolation).
    """
    from fedllm.clients.client_app import app
    from fedllm.federation.warm_worker import serve
    from fedllm.telemetry.logging import configure_logging

    hospital = _load(config)
    state = prepare_private_state(hospital)
    configure_logging()
    secret = superexec_secret_path(state)
    with sigterm_as_interrupt():
        try:
            serve(
                runtime_api_address(hospital),
                app,
                state_dir=state,
                secret_file=secret if secret.is_file() else None,
            )
        except WorkerError as error:
            fail(str(error))
        except KeyboardInterrupt:
            return


def prepare_private_state(hospital: HospitalConfig) -> Path:
    """Make everything this process and its children create private, before creating any of it.

    The umask (inherited by the SuperNode, its ClientApps and the inference server) keeps new
    logs, databases and keys 0600 and directories 0700; the state directory and a SQLite
    ledger are created so explicitly too.
    """
    use_private_umask()
    state = private_directory(hospital.runtime.state_dir)
    ledger = sqlite_path(hospital.privacy.ledger_url)
    if ledger is not None:
        create_private_file(ledger)
    return state
