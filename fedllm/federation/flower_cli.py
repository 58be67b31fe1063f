"""The Flower CLI's side of a deployment: connections, SuperNode registration, ``flwr run``.

``flwr`` finds a SuperLink in ``$FLWR_HOME/config.toml`` (``[superlink.<name>] address = ...,
root-certificates = ...``). The operator registers hospitals' public keys through it and the
researcher's ``fedllm run --federation NAME`` runs through it; each gets a private FLWR_HOME
so that no command touches another's Flower state.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedllm.federation.deployment import DeploymentError, check_security
from fedllm.federation.launcher import flower_environment

OPERATOR_CONNECTION = "fedllm-operator"


def write_flower_connection(
    flwr_home: Path,
    name: str,
    address: str,
    root_certificates: Path | None,
    *,
    insecure: bool = False,
) -> Path:
    """A private ``FLWR_HOME/config.toml`` whose default connection is this SuperLink.

    The Flower CLI (``flwr run``, ``flwr supernode register``) reaches a TLS SuperLink through
    ``[superlink.<name>] address = ... root-certificates = ...``.
    """
    check_security(root_certificates is not None, insecure)
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (
        "insecure = true"
        if insecure
        # Flower refuses a relative path ("expected absolute path"), and a relative one would
        # also depend on the directory the Flower CLI happens to run in
        else f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}"
    )
    path = flwr_home / "config.toml"
    path.write_text(
        f"[superlink]\ndefault = {json.dumps(name)}\n\n"
        f"[superlink.{json.dumps(name)}]\naddress = {json.dumps(address)}\n{security}\n",
        encoding="utf-8",
    )
    return path


def register_supernode(
    flwr_home: Path, connection: str, public_key: Path, name: str
) -> tuple[str, int | None]:
    """Register a hospital's public key with the SuperLink (``flwr supernode register``).

    Returns ``"registered"`` and the node id Flower assigned, or ``"already registered"`` and
    None when the SuperLink's database already holds the key (a restarted SuperLink keeps its
    registrations; Flower then names no node id), so starting the operator's SuperLink twice
    is harmless.
    """
    if not public_key.is_file():
        raise DeploymentError(f"public key of {name!r} not found: {public_key}")
    result = subprocess.run(
        [
            "flwr",
            "supernode",
            "register",
            str(public_key),
            connection,
            "--name",
            name,
            "--format",
            "json",
        ],
        env=flower_environment(flwr_home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = f"{result.stdout}\n{result.stderr}"
    node_id = re.search(r'"node-id":\s*(\d+)', result.stdout)
    if result.returncode == 0 and '"success": true' in output and node_id:
        return "registered", int(node_id.group(1))
    if "already" in output.lower():
        return "already registered", None
    raise DeploymentError(f"could not register {name!r} ({public_key}): {output.strip()[-800:]}")


@dataclass(frozen=True)
class DeployedFederation:
    """A deployed SuperLink as the researcher's Flower config names it.

    The experiment goes there as data, like on a local SuperLink (``fedllm run`` passes the
    validated config to the ServerApp, which sends it to every hospital): no experiment file
    needs to be inside the Flower App Bundle.
    """

    name: str
    address: str
    root_certificates: Path | None
    insecure: bool

    def connect(self, flwr_home: Path) -> None:
        """Point a private FLWR_HOME at this SuperLink (``flwr run`` reads it)."""
        write_flower_connection(
            flwr_home, self.name, self.address, self.root_certificates, insecure=self.insecure
        )


def flower_config_path() -> Path:
    """The Flower CLI's own config: ``$FLWR_HOME/config.toml``, else ``~/.flwr/config.toml``."""
    home = os.environ.get("FLWR_HOME")
    return (Path(home) if home else Path.home() / ".flwr") / "config.toml"


def deployed_federation(name: str, *, flower_config: Path | None = None) -> DeployedFederation:
    """Resolve ``fedllm run --federation NAME``: the ``[superlink.NAME]`` entry of the Flower
    config (``address``, ``root-certificates`` or ``insecure = true``)."""
    path = flower_config or flower_config_path()
    if not path.is_file():
        raise DeploymentError(
            f"no Flower config at {path}; add a [superlink.{name}] entry with address and "
            "root-certificates (see docs/deploy.md)"
        )
    try:
        connections = tomllib.loads(path.read_text(encoding="utf-8")).get("superlink", {})
    except tomllib.TOMLDecodeError as error:
        raise DeploymentError(f"{path}: invalid TOML: {error}") from None
    entry = connections.get(name)
    if not isinstance(entry, dict):
        known = sorted(k for k, v in connections.items() if isinstance(v, dict))
        raise DeploymentError(f"{path} has no [superlink.{name}] entry; known: {known}")
    address, insecure = entry.get("address"), bool(entry.get("insecure", False))
    certificates = entry.get("root-certificates")
    if not isinstance(address, str) or not address:
        raise DeploymentError(f"[superlink.{name}] in {path} has no address")
    if not insecure and not certificates:
        raise DeploymentError(
            f"[superlink.{name}] in {path} needs root-certificates (the consortium's ca.crt), "
            "or insecure = true for a test network"
        )
    root = None
    if certificates:
        root = Path(str(certificates)).expanduser()
        root = root if root.is_absolute() else path.parent / root
        if not root.is_file():
            raise DeploymentError(f"root-certificates of [superlink.{name}] not found: {root}")
    return DeployedFederation(name, address, root, insecure)
