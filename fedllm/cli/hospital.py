"""``fedllm hospital``: what a hospital's IT runs to join the federation.

``fedllm hospital start --config hospital.yaml`` starts the hospital's Flower SuperNode (TLS,
SuperNode authentication, the hospital's own data and privacy ledger) and, when configured,
its inference server, and stops both when either stops or on Ctrl-C / SIGTERM.
``fedllm hospital check`` validates the file and shows what would run, starting nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import console, error_console, fail, print_json
from fedllm.config.hospital import HospitalConfig, load_hospital_config
from fedllm.config.loading import ConfigError
from fedllm.federation.deployment import (
    INSECURE_WARNING,
    DeploymentError,
    hospital_node_config,
    hospital_supernode_command,
    missing_hospital_files,
    write_inference_config,
)
from fedllm.federation.launcher import stop_process_tree
from fedllm.federation.processes import (
    log_tail,
    sigterm_as_interrupt,
    start_process,
    wait_for_first_exit,
)

hospital_app = typer.Typer(
    name="hospital",
    help="Run this hospital's part of the federation (Flower SuperNode, inference server).",
    no_args_is_help=True,
)

ConfigOption = Annotated[
    Path, typer.Option("--config", help="The hospital's YAML, e.g. configs/hospital.yaml")
]

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
def check_command(config: ConfigOption, json_output: bool = typer.Option(False, "--json")) -> None:
    """Validate hospital.yaml and print the SuperNode command and node config it implies."""
    hospital = _load(config)
    try:
        command = hospital_supernode_command(hospital)
    except DeploymentError as error:
        fail(str(error))
    summary = {
        "hospital": hospital.hospital,
        "supernode": command,
        "node_config": hospital_node_config(hospital),
        "inference_server": hospital.inference is not None,
    }
    if json_output:
        print_json(summary)
        return
    console.print(f"[green]ok[/] {config}: hospital [bold]{hospital.hospital}[/]")
    console.print("SuperNode: " + " ".join(command), highlight=False, soft_wrap=True)


@hospital_app.command("start")
def start_command(config: ConfigOption) -> None:
    """Start the SuperNode (and the inference server when configured) until Ctrl-C."""
    hospital = _load(config)
    if hospital.superlink.insecure:
        error_console.print(f"[bold red]WARNING: {INSECURE_WARNING}[/]", highlight=False)
    state = hospital.runtime.state_dir
    try:
        supernode_command = hospital_supernode_command(hospital)
    except DeploymentError as error:
        fail(str(error))
    logs = {"supernode": state / "supernode.log", "inference": state / "inference.log"}
    processes = {}
    with sigterm_as_interrupt():
        try:
            processes["supernode"] = start_process(
                supernode_command, state / "flwr", logs["supernode"]
            )
            node_yaml = write_inference_config(hospital)
            if node_yaml is not None:
                serve = [sys.executable, "-m", "fedllm.cli", "serve", "--config", str(node_yaml)]
                processes["inference"] = start_process(serve, state / "flwr", logs["inference"])
            console.print(
                f"hospital [bold]{hospital.hospital}[/]: SuperNode → {hospital.superlink.address}"
                + (
                    f", inference server on {hospital.inference.host}:{hospital.inference.port}"
                    if hospital.inference
                    else ""
                )
                + f"; logs in {state}. Ctrl-C stops.",
                highlight=False,
            )
            name, code = wait_for_first_exit(processes)
        except KeyboardInterrupt:
            console.print("stopping ...")
            return
        finally:
            for process in processes.values():
                stop_process_tree(process)
    tail = log_tail(logs[name])
    hint = ""
    if name == "supernode" and "activate SuperNode" in tail and hospital.auth:
        hint = "\n" + NOT_REGISTERED_HINT.format(public_key=hospital.auth.public_key or "*.pub")
    fail(f"the {name} stopped (exit code {code}); see {logs[name]}\n{tail}{hint}")
