"""``fedllm superlink``: what the federation operator runs.

``start`` runs Flower's SuperLink with the consortium's TLS certificate and SuperNode
authentication, registers every hospital's public key from the credentials directory, and
keeps running until Ctrl-C / SIGTERM. ``register`` adds a hospital that joins later to a
running SuperLink.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import console, error_console, fail
from fedllm.federation.deployment import (
    DEFAULT_SUPERLINK_PORT,
    INSECURE_WARNING,
    DeploymentError,
    SuperLinkTls,
    superlink_command,
)
from fedllm.federation.flower_cli import (
    OPERATOR_CONNECTION,
    register_supernode,
    write_flower_connection,
)
from fedllm.federation.launcher import FederationError, stop_process_tree, wait_until_healthy
from fedllm.federation.processes import (
    log_tail,
    sigterm_as_interrupt,
    start_process,
    wait_for_first_exit,
)
from fedllm.security.certs import Credentials, CredentialsError, load_credentials

superlink_app = typer.Typer(
    name="superlink",
    help="Run the federation's Flower SuperLink and register hospitals (operator).",
    no_args_is_help=True,
)

CredentialsOption = Annotated[
    Path | None,
    typer.Option("--credentials", help="Credentials directory from `fedllm certs init`."),
]
HospitalOption = Annotated[
    list[str] | None,
    typer.Option("--hospital", help="Register only these hospitals (repeat); default: all."),
]


def _credentials(directory: Path) -> Credentials:
    try:
        return load_credentials(directory)
    except CredentialsError as error:
        fail(str(error))


def _register_all(
    credentials: Credentials, hospitals: list[str], flwr_home: Path, address: str
) -> dict[str, str]:
    unknown = sorted(set(hospitals) - set(credentials.supernode_keys))
    if unknown:
        fail(
            f"no SuperNode key for {unknown} in {credentials.root}; "
            "issue one with `fedllm certs add-hospital`"
        )
    write_flower_connection(flwr_home, OPERATOR_CONNECTION, address, credentials.ca_cert)
    return {
        name: register_supernode(
            flwr_home, OPERATOR_CONNECTION, credentials.supernode_keys[name][1], name
        )
        for name in hospitals
    }


def _local_address(host: str, port: int) -> str:
    """Where this machine reaches the SuperLink: a wildcard bind is reached on loopback."""
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"{reachable}:{port}"


@superlink_app.command("start")
def start_command(
    credentials: CredentialsOption = None,
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")
    ] = "0.0.0.0",
    port: Annotated[
        int, typer.Option(help="The one HTTPS port of Fleet, Control and Runtime APIs.")
    ] = DEFAULT_SUPERLINK_PORT,
    state_dir: Annotated[Path, typer.Option(help="SuperLink database, logs, Flower state.")] = Path(
        "superlink-state"
    ),
    hospital: HospitalOption = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no SuperNode authentication (tests only).")
    ] = False,
) -> None:
    """Start the SuperLink, register the hospitals' keys, run until Ctrl-C."""
    if insecure == (credentials is not None):
        fail("give --credentials DIR (TLS + SuperNode authentication), or --insecure for a test")
    creds = _credentials(credentials) if credentials is not None else None
    if creds is None:
        error_console.print(f"[bold red]WARNING: {INSECURE_WARNING}[/]", highlight=False)
    state_dir = state_dir.resolve()
    tls = SuperLinkTls(creds.ca_cert, creds.superlink_cert, creds.superlink_key) if creds else None
    log_path = state_dir / "superlink.log"
    address = _local_address(host, port)
    with sigterm_as_interrupt():
        process = start_process(
            superlink_command(
                host=host,
                port=port,
                database=state_dir / "superlink.db",
                tls=tls,
                insecure=insecure,
            ),
            state_dir / "flwr",
            log_path,
        )
        try:
            scheme, verify = ("http", False) if creds is None else ("https", str(creds.ca_cert))
            wait_until_healthy(process, f"{scheme}://{address}/health", log_path, verify=verify)
            if creds is not None:
                names = hospital or sorted(creds.supernode_keys)
                outcome = _register_all(creds, names, state_dir / "operator-flwr", address)
                for name, status in outcome.items():
                    console.print(f"  hospital [bold]{name}[/]: {status}", highlight=False)
            console.print(
                f"SuperLink on {host}:{port}; log {log_path}. Researchers add to their Flower "
                f"config (~/.flwr/config.toml):\n"
                f'  [superlink.NAME]\n  address = "<this host>:{port}"\n'
                + (
                    f'  root-certificates = "<path to>/{creds.ca_cert.name}"'
                    if creds
                    else "  insecure = true"
                )
                + "\nthen: fedllm run configs/x.yaml --federation NAME. Ctrl-C stops.",
                highlight=False,
                markup=False,
            )
            _, code = wait_for_first_exit({"superlink": process})
        except FederationError as error:
            fail(f"{error}\n{log_tail(log_path)}")
        except KeyboardInterrupt:
            console.print("stopping ...")
            return
        finally:
            stop_process_tree(process)
    fail(f"flower-superlink stopped (exit code {code}); see {log_path}\n{log_tail(log_path)}")


@superlink_app.command("register")
def register_command(
    credentials: Annotated[
        Path, typer.Option("--credentials", help="Credentials directory with the hospital's key.")
    ],
    hospital: Annotated[list[str], typer.Option("--hospital", help="Hospital to register.")],
    address: Annotated[
        str, typer.Option(help="The SuperLink as host:port.")
    ] = f"127.0.0.1:{DEFAULT_SUPERLINK_PORT}",
) -> None:
    """Register hospitals' SuperNode public keys with a running SuperLink."""
    creds = _credentials(credentials)
    with tempfile.TemporaryDirectory(prefix="fedllm-flwr-") as flwr_home:
        try:
            outcome = _register_all(creds, hospital, Path(flwr_home), address)
        except DeploymentError as error:
            fail(str(error))
    for name, status in outcome.items():
        console.print(f"hospital [bold]{name}[/]: {status}", highlight=False)
