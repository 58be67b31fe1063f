"""``fedllm deliver``: bring a finished run's published DP adapter to every hospital again.

A hospital that was offline at the end of a run, or whose inference server lost its adapter,
gets it from the federation itself: a Flower run on the deployed SuperLink whose ServerApp
trains nothing and sends only the end-of-run delivery message (``query.deliver``,
:mod:`fedllm.federation.delivery`). Nothing is charged to any ledger: a hospital's reply is the
acknowledgement of the release inventory. Like ``fedllm run --federation``, it runs where the
run directory is (the SuperLink's host, or a shared file system).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedllm.cli.common import console, fail, print_json
from fedllm.config import ConfigError, load_config
from fedllm.federation.experiment import APP_ROOT, EXPERIMENT, experiment_json
from fedllm.federation.flower_cli import deployed_federation
from fedllm.federation.launcher import FederationError, run_app
from fedllm.security.encryption import EncryptionError
from fedllm.security.environment import keyring_from_environment


def deliver_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's directory, e.g. runs/x")],
    federation: Annotated[
        str,
        typer.Option(
            "--federation",
            help="The deployed SuperLink: a \\[superlink.NAME] entry of your Flower config",
        ),
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON")] = False,
) -> None:
    """Deliver a finished run's published DP adapter to every connected hospital again."""
    from fedllm.federation.delivery import (
        DELIVER_REQUEST,
        DELIVERIES_DIR,
        NothingToDeliverError,
        published_adapter,
        read_delivery,
    )

    run_dir = run_dir.resolve()
    try:
        # checked before anything is contacted
        published = published_adapter(run_dir, keyring=keyring_from_environment())
        config = load_config(run_dir / "config.yaml")
        target = deployed_federation(federation)
    except (ConfigError, NothingToDeliverError, FederationError, EncryptionError) as error:
        fail(str(error).splitlines()[0])
    request = secrets.token_hex(8)
    log_path = run_dir / DELIVERIES_DIR / f"{request}.log"
    log_path.parent.mkdir(exist_ok=True)
    flwr_home = run_dir / ".flwr"
    target.connect(flwr_home)
    run_config = {
        EXPERIMENT: experiment_json(config),
        "run-dir": str(run_dir),
        DELIVER_REQUEST: request,
    }
    if not json_output:
        console.print(f"delivering {published} to the hospitals of {federation} ...")
    try:
        run_app(APP_ROOT, flwr_home, run_config, None, log_path, connection=target.name)
    except FederationError as error:
        fail(str(error))
    outcome = read_delivery(run_dir, request)
    if outcome is None:
        fail(f"the ServerApp recorded no delivery; see {log_path}")
    if json_output:
        print_json(outcome)
    else:
        show_outcome(outcome)
    if outcome["refused"]:
        raise typer.Exit(1)


def show_outcome(outcome: dict[str, Any]) -> None:
    """One row per hospital: delivered, skipped (no inference server), or refused and why."""
    table = Table("hospital", "result")
    for name in outcome["delivered"]:
        table.add_row(name, "[green]delivered[/]")
    for name in outcome["skipped"]:
        table.add_row(name, "skipped (no inference server)")
    for reason in outcome["refused"]:
        # "hospital NAME: Error: why", or a count of hospitals that did not answer
        name, _, why = reason.partition(": ")
        if name.startswith("hospital ") and why:
            table.add_row(name.removeprefix("hospital "), f"[red]refused[/]: {why}")
        else:
            table.add_row("", f"[red]refused[/]: {reason}")
    console.print(table)
    console.print(f"adapter sha256 {outcome['adapter_sha256']}", highlight=False)
