"""``fedllm superlink``: what the federation operator runs.

``start`` runs Flower's SuperLink with the consortium's TLS certificate and SuperNode
authentication on 127.0.0.1 only, and in front of it, on the public address, fedllm's TLS front
that forwards the Fleet API (SuperNodes) and refuses the Control and Runtime APIs, which have no
authentication in open-source Flower 1.42 (:mod:`fedllm.federation.superlink_front`). It
registers every hospital's public key from the credentials directory through the loopback
Control API, records each hospital's name, key and node id in the operator's node registry
(:mod:`fedllm.federation.node_registry`), and keeps running until Ctrl-C / SIGTERM.
``register`` adds a hospital that joins later to a running SuperLink.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import console, error_console, fail
from fedllm.federation.deployment import (
    DEFAULT_CONTROL_PORT,
    DEFAULT_SUPERLINK_PORT,
    INSECURE_WARNING,
    LOOPBACK,
    DeploymentError,
    SuperLinkTls,
    front_command,
    superlink_command,
)
from fedllm.federation.flower_cli import (
    OPERATOR_CONNECTION,
    register_supernode,
    write_flower_connection,
)
from fedllm.federation.launcher import FederationError, stop_process_tree, wait_until_healthy
from fedllm.federation.node_registry import (
    REGISTRY_ENV,
    REGISTRY_FILE,
    NodeRegistry,
    RegistryError,
    node_id_in_superlink_db,
)
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
StateDirOption = Annotated[
    Path,
    typer.Option(help="SuperLink database, node registry, logs, Flower state."),
]


def _credentials(directory: Path) -> Credentials:
    try:
        return load_credentials(directory)
    except CredentialsError as error:
        fail(str(error))


def _register_all(
    credentials: Credentials, hospitals: list[str], flwr_home: Path, address: str, state_dir: Path
) -> dict[str, str]:
    """Register each hospital's key and bind its name to the key and node id in the registry."""
    unknown = sorted(set(hospitals) - set(credentials.supernode_keys))
    if unknown:
        fail(
            f"no SuperNode key for {unknown} in {credentials.root}; "
            "issue one with `fedllm certs add-hospital`"
        )
    write_flower_connection(flwr_home, OPERATOR_CONNECTION, address, credentials.ca_cert)
    registry = NodeRegistry.load(state_dir / REGISTRY_FILE)
    outcome = {}
    for name in hospitals:
        public_key = credentials.supernode_keys[name][1]
        status, node_id = register_supernode(flwr_home, OPERATOR_CONNECTION, public_key, name)
        if node_id is None:
            node_id = node_id_in_superlink_db(state_dir / "superlink.db", public_key)
        entry = registry.record(name, public_key, node_id)
        outcome[name] = f"{status}, node {entry.node_id if entry.node_id is not None else '?'}"
    registry.save()  # exists even when no hospital was registered: the ServerApp reads it
    return outcome


def _local_address(host: str, port: int) -> str:
    """Where this machine reaches the front: a wildcard bind is reached on loopback."""
    reachable = LOOPBACK if host in ("0.0.0.0", "::", "") else host
    return f"{reachable}:{port}"


@superlink_app.command("start")
def start_command(
    credentials: CredentialsOption = None,
    host: Annotated[
        str,
        typer.Option(help="Interface of the public front (0.0.0.0: every interface)."),
    ] = "0.0.0.0",
    port: Annotated[
        int, typer.Option(help="The public HTTPS port: SuperNodes' Fleet API only.")
    ] = DEFAULT_SUPERLINK_PORT,
    control_port: Annotated[
        int,
        typer.Option(
            help="flower-superlink itself, on 127.0.0.1 only: Control API (flwr run, "
            "flwr supernode register), Runtime API and Fleet API."
        ),
    ] = DEFAULT_CONTROL_PORT,
    state_dir: StateDirOption = Path("superlink-state"),
    hospital: HospitalOption = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no SuperNode authentication (tests only).")
    ] = False,
) -> None:
    """Start the SuperLink and its public front, register the hospitals' keys, run until Ctrl-C."""
    if insecure == (credentials is not None):
        fail("give --credentials DIR (TLS + SuperNode authentication), or --insecure for a test")
    if port == control_port:
        fail(f"--port and --control-port are both {port}; the front and the SuperLink need two")
    creds = _credentials(credentials) if credentials is not None else None
    if creds is None:
        error_console.print(f"[bold red]WARNING: {INSECURE_WARNING}[/]", highlight=False)
    state_dir = state_dir.resolve()
    tls = SuperLinkTls(creds.ca_cert, creds.superlink_cert, creds.superlink_key) if creds else None
    logs = {"superlink": state_dir / "superlink.log", "front": state_dir / "front.log"}
    control = f"{LOOPBACK}:{control_port}"
    scheme, verify = ("http", False) if creds is None else ("https", str(creds.ca_cert))
    if creds is not None:
        # the ServerApp (a subprocess of flower-superlink) checks hospitals' claims against it;
        # in insecure mode no key is registered, so there is nothing to bind a name to
        os.environ[REGISTRY_ENV] = str(state_dir / REGISTRY_FILE)
    processes = {}
    name = "superlink"
    with sigterm_as_interrupt():
        try:
            processes[name] = start_process(
                superlink_command(
                    host=LOOPBACK,
                    port=control_port,
                    database=state_dir / "superlink.db",
                    tls=tls,
                    insecure=insecure,
                ),
                state_dir / "flwr",
                logs[name],
            )
            wait_until_healthy(
                processes[name], f"{scheme}://{control}/health", logs[name], verify=verify
            )
            if creds is not None:
                names = hospital or sorted(creds.supernode_keys)
                outcome = _register_all(
                    creds, names, state_dir / "operator-flwr", control, state_dir
                )
                for hospital_name, status in outcome.items():
                    console.print(f"  hospital [bold]{hospital_name}[/]: {status}", highlight=False)
            name = "front"
            processes[name] = start_process(
                front_command(
                    host=host, port=port, control_port=control_port, tls=tls, insecure=insecure
                ),
                state_dir / "flwr",
                logs[name],
            )
            front_url = f"{scheme}://{_local_address(host, port)}/health"
            wait_until_healthy(processes[name], front_url, logs[name], verify=verify)
            console.print(_banner(host, port, control, logs, creds), highlight=False, markup=False)
            name, code = wait_for_first_exit(processes)
        except (FederationError, RegistryError) as error:
            fail(f"{name}: {error}\n{log_tail(logs[name])}")
        except KeyboardInterrupt:
            console.print("stopping ...")
            return
        finally:
            for process in reversed(processes.values()):
                stop_process_tree(process)
    fail(f"the {name} stopped (exit code {code}); see {logs[name]}\n{log_tail(logs[name])}")


def _banner(
    host: str, port: int, control: str, logs: dict[str, Path], creds: Credentials | None
) -> str:
    security = (
        f'  root-certificates = "<path to>/{creds.ca_cert.name}"' if creds else "  insecure = true"
    )
    tunnel = f"ssh -L {control.rpartition(':')[2]}:{control} <this host>"
    return (
        f"SuperLink front on {host}:{port} (SuperNodes' Fleet API only; Control API refused); "
        f"SuperLink on {control} (Control API: this host only, or `{tunnel}` from a "
        f"researcher's machine). Logs: {logs['superlink']}, {logs['front']}.\n"
        "Researchers add to their Flower config (~/.flwr/config.toml):\n"
        f'  [superlink.NAME]\n  address = "{control}"\n{security}\n'
        "then: fedllm run configs/x.yaml --federation NAME. Ctrl-C stops."
    )


@superlink_app.command("register")
def register_command(
    credentials: Annotated[
        Path, typer.Option("--credentials", help="Credentials directory with the hospital's key.")
    ],
    hospital: Annotated[list[str], typer.Option("--hospital", help="Hospital to register.")],
    address: Annotated[
        str,
        typer.Option(help="The SuperLink's loopback Control API as host:port (not the front)."),
    ] = f"{LOOPBACK}:{DEFAULT_CONTROL_PORT}",
    state_dir: StateDirOption = Path("superlink-state"),
) -> None:
    """Register hospitals' SuperNode public keys with a running SuperLink, and record them."""
    creds = _credentials(credentials)
    with tempfile.TemporaryDirectory(prefix="fedllm-flwr-") as flwr_home:
        try:
            outcome = _register_all(creds, hospital, Path(flwr_home), address, state_dir.resolve())
        except (DeploymentError, RegistryError) as error:
            fail(str(error))
    for name, status in outcome.items():
        console.print(f"hospital [bold]{name}[/]: {status}", highlight=False)
