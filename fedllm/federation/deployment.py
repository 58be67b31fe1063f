"""Flower's deployment runtime across machines: a SuperLink and SuperNodes, secure by default.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode
register``) and the Runtime API (the ServerApp) from one HTTPS port of ``flower-superlink``.
Everything here builds the exact command lines and files Flower reads, so that TLS
(``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` on the SuperLink, ``--root-certificates``
on SuperNodes and in the Flower CLI's ``config.toml``) and SuperNode authentication
(``--enable-supernode-auth`` on the SuperLink, each hospital's public key registered through
the Control API, ``--auth-supernode-private-key`` on its SuperNode) are on unless a caller asks
for insecure mode explicitly, and then loudly. Because that port's Control API has no
authentication in open-source Flower 1.42, ``flower-superlink`` listens on 127.0.0.1 and the
public port is served by fedllm's front (:mod:`fedllm.federation.superlink_front`), which
forwards the Fleet API only.
"""

from __future__ import annotations

import json
import socket
import ssl
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog
import yaml

from fedllm.federation import node_settings as keys
from fedllm.federation.hospital_config import HospitalConfig
from fedllm.federation.launcher import FederationError
from fedllm.federation.worker_state import ensure_superexec_secret, superexec_secret_path

DEFAULT_SUPERLINK_PORT = 9092
# flower-superlink itself, on 127.0.0.1 only: its Control API has no authentication in 1.42
DEFAULT_CONTROL_PORT = 9093
LOOPBACK = "127.0.0.1"

INSECURE_WARNING = (
    "INSECURE MODE: TLS and SuperNode authentication are OFF. Model updates and privacy "
    "reports travel unencrypted and ANY machine that can reach the SuperLink can join the "
    "federation. Use only on a laptop or in a test network, never with real patient data."
)

log = structlog.get_logger(__name__)

NodeValue = str | int | float | bool


class DeploymentError(FederationError):
    """A deployment cannot start as configured (missing file, refused registration...)."""


@dataclass(frozen=True)
class SuperLinkTls:
    """The SuperLink's TLS files: the consortium CA and the SuperLink's certificate and key."""

    ca_cert: Path
    cert: Path
    key: Path


def superlink_command(
    *,
    host: str,
    port: int,
    database: Path,
    tls: SuperLinkTls | None,
    insecure: bool = False,
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication, or explicitly insecure.

    Apps run in a subprocess of the SuperLink (``--isolation subprocess``) from the Flower App
    Bundle ``flwr run`` uploads, in this environment: runtime dependency installation is off,
    so a run can never pull code from a package index onto the consortium's server.
    """
    check_security(tls is not None, insecure)
    command = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        return [*command, "--insecure"]
    return [*command, *tls_arguments(tls), "--enable-supernode-auth"]


def tls_arguments(tls: SuperLinkTls) -> list[str]:
    """The server-side TLS options ``flower-superlink`` and the front take alike."""
    return [
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.cert),
        "--ssl-keyfile",
        str(tls.key),
    ]


def front_command(
    *, host: str, port: int, control_port: int, tls: SuperLinkTls | None, insecure: bool = False
) -> list[str]:
    """The SuperLink's public TLS front (:mod:`fedllm.federation.superlink_front`).

    It listens on ``host:port`` with the SuperLink's own certificate and forwards only the
    Fleet API to ``flower-superlink`` on ``127.0.0.1:control_port``.
    """
    check_security(tls is not None, insecure)
    command = [
        sys.executable,
        "-m",
        "fedllm.federation.superlink_front",
        "--host",
        host,
        "--port",
        str(port),
        "--upstream",
        f"{LOOPBACK}:{control_port}",
    ]
    if tls is None:
        return [*command, "--insecure"]
    return [*command, *tls_arguments(tls)]


def supernode_command(
    *,
    superlink: str,
    root_certificates: Path | None,
    auth_private_key: Path | None,
    node_config_file: Path,
    clientapp_port: int,
    insecure: bool = False,
    max_retries: int | None = None,
    max_wait_s: float | None = None,
    superexec_secret: Path | None = None,
) -> list[str]:
    """``flower-supernode`` that verifies the SuperLink's certificate and signs every request.

    ``clientapp_port`` is the SuperNode's local Runtime API (127.0.0.1 only), which the app's
    executor talks to; two SuperNodes on one machine need two ports. Without
    ``superexec_secret``, Flower runs each message in a ``flwr-clientapp`` subprocess; with it,
    the SuperNode runs in process isolation and hands its tasks only to an executor holding
    that secret: the hospital's warm worker (:mod:`fedllm.federation.warm_worker`). Flower's
    SuperNode runs through :mod:`fedllm.federation.supernode_process`, which sizes the waits of
    its message loop for a warm hospital and is otherwise Flower's own.
    """
    check_security(root_certificates is not None, insecure)
    if insecure and auth_private_key is not None:
        raise DeploymentError(
            "SuperNode authentication needs TLS: drop the key or the insecure flag"
        )
    if not insecure and auth_private_key is None:
        raise DeploymentError("an authentication private key is required with TLS")
    command = [
        sys.executable,
        "-m",
        "fedllm.federation.supernode_process",
        "--superlink",
        superlink,
        "--node-config",
        str(node_config_file),
        "--isolation",
        "subprocess" if superexec_secret is None else "process",
        "--host",
        LOOPBACK,
        "--port",
        str(clientapp_port),
    ]
    if superexec_secret is not None:
        command += ["--superexec-auth-secret-file", str(superexec_secret)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_s is not None:
        command += ["--max-wait-time", str(max_wait_s)]
    if insecure:
        return [*command, "--insecure"]
    return [
        *command,
        "--root-certificates",
        str(root_certificates),
        "--auth-supernode-private-key",
        str(auth_private_key),
    ]


def check_security(have_tls: bool, insecure: bool) -> None:
    """Secure unless insecure mode is asked for explicitly; then warn, every time."""
    if have_tls and insecure:
        raise DeploymentError("TLS files and insecure mode were both given; choose one")
    if not have_tls and not insecure:
        raise DeploymentError(
            "TLS files are required; insecure mode must be asked for explicitly (--insecure)"
        )
    if insecure:
        log.warning("deployment.insecure", warning=INSECURE_WARNING)


def write_node_config(path: Path, values: Mapping[str, NodeValue]) -> Path:
    """The SuperNode's node config as a TOML file (``--node-config FILE.toml``).

    A file, not the ``key="value"`` command-line form, so that paths and database URLs with
    spaces or quotes reach the ClientApp unchanged (JSON string escapes are valid TOML).
    """
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml_value(value: NodeValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def hospital_node_config(config: HospitalConfig) -> dict[str, NodeValue]:
    """What the hospital's ClientApp reads (see :mod:`fedllm.federation.node_settings`)."""
    values: dict[str, NodeValue] = {
        keys.HOSPITAL_NAME: config.hospital,
        keys.DATA_PATH: str(config.data.path),
        keys.DATA_FORMAT: config.data.resolved_format(),
        keys.DATA_TEXT_FIELD: config.data.text_field,
        keys.LEDGER_URL: config.privacy.ledger_url,
        keys.EVALUATION: config.privacy.evaluation,
    }
    if config.privacy.split_key_file is not None:
        values[keys.SPLIT_KEY_FILE] = str(config.privacy.split_key_file)
    if config.data.specialty_field:
        values[keys.DATA_SPECIALTY_FIELD] = config.data.specialty_field
    if config.data.patient_field:
        values[keys.DATA_PATIENT_FIELD] = config.data.patient_field
    if config.privacy.epsilon_cap is not None:
        values[keys.EPSILON_CAP] = config.privacy.epsilon_cap
    if config.inference is not None and config.inference.adapter_dir is not None:
        # where the federation delivers its published adapter, for this node's server to serve
        values[keys.ADAPTER_DIR] = str(config.inference.adapter_dir)
    return values


def hospital_supernode_command(config: HospitalConfig, *, write_config: bool = True) -> list[str]:
    """The SuperNode of ``hospital.yaml``, its node config written under its state dir.

    With ``runtime.warm_worker`` it runs in process isolation, its tasks claimed by the worker
    with the secret they share (created here when missing). ``write_config=False`` only names
    those files (``fedllm hospital check`` writes nothing).
    """
    node_config = config.runtime.state_dir / "node-config.toml"
    secret = None
    if config.runtime.warm_worker:
        secret = superexec_secret_path(config.runtime.state_dir)
    if write_config:
        write_node_config(node_config, hospital_node_config(config))
        if secret is not None:
            ensure_superexec_secret(config.runtime.state_dir)
    return supernode_command(
        superlink=config.superlink.address,
        root_certificates=config.superlink.ca_cert,
        auth_private_key=config.auth.private_key if config.auth else None,
        node_config_file=node_config,
        clientapp_port=config.runtime.clientapp_port,
        insecure=config.superlink.insecure,
        max_retries=config.runtime.max_retries,
        max_wait_s=config.runtime.max_wait_s,
        superexec_secret=secret,
    )


def runtime_api_address(config: HospitalConfig) -> str:
    """Where the hospital's SuperNode serves its Runtime API: loopback only."""
    return f"{LOOPBACK}:{config.runtime.clientapp_port}"


def missing_hospital_files(config: HospitalConfig) -> list[str]:
    """Files ``hospital.yaml`` points to that do not exist, named by their key."""
    candidates: list[tuple[str, Path | None]] = [
        ("superlink.ca_cert", config.superlink.ca_cert),
        ("data.path", config.data.path),
    ]
    if config.auth is not None:
        candidates.append(("auth.private_key", config.auth.private_key))
    return [
        f"{key}: {path} does not exist" for key, path in candidates if path and not path.is_file()
    ]


def write_inference_config(config: HospitalConfig) -> Path | None:
    """The ``inference`` section as the ``node.yaml`` that ``fedllm serve`` reads."""
    if config.inference is None:
        return None
    path = config.runtime.state_dir / "node.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(config.inference.model_dump(mode="json"), sort_keys=False), "utf-8"
    )
    return path


def key_mode_problems(config: HospitalConfig) -> list[str]:
    """Secret files that other accounts could read: each must be 0600 (or stricter).

    The SuperNode's private key lets anyone who reads it join the federation as this hospital;
    the split key decides which patients are held out.
    """
    secrets = []
    if config.auth is not None:
        secrets.append(("auth.private_key", config.auth.private_key))
    if config.privacy.split_key_file is not None:
        secrets.append(("privacy.split_key_file", config.privacy.split_key_file))
    problems = []
    for key, path in secrets:
        if not path.is_file():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            problems.append(
                f"{key}: {path} has mode {mode:04o}; other accounts can read it "
                f"(run: chmod 600 {path})"
            )
    return problems


def data_summary(config: HospitalConfig) -> int:
    """The number of records the hospital's file holds, read exactly as training reads it.

    Raises `fedllm.data.DataError` naming the file, row and column that do not fit the
    ``data`` section (a wrong ``text_field`` lists the file's real columns).
    """
    from fedllm.data import load_records

    data = config.data
    return len(
        load_records(
            data.resolved_format(),
            str(data.path),
            text_field=data.text_field,
            specialty_field=data.specialty_field,
            patient_field=data.patient_field,
        )
    )


def superlink_handshake(config: HospitalConfig, timeout_s: float = 10.0) -> str:
    """Reach the SuperLink: TCP, then TLS verified against ``superlink.ca_cert``; what it said.

    Nothing is sent beyond the handshake and nothing is written. In insecure mode only TCP is
    tried. Raises `DeploymentError` with one line naming what failed.
    """
    host, _, port = config.superlink.address.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
            if config.superlink.insecure:
                return f"TCP connection to {config.superlink.address} (insecure mode: no TLS)"
            context = ssl.create_default_context(cafile=str(config.superlink.ca_cert))
            context.set_alpn_protocols(["h2"])
            with context.wrap_socket(connection, server_hostname=host) as tls:
                subject = dict(part[0] for part in tls.getpeercert().get("subject", ()))
                return (
                    f"{tls.version()} to {config.superlink.address}, certificate "
                    f"{subject.get('commonName', '?')!r} verified against "
                    f"{config.superlink.ca_cert}"
                )
    except ssl.SSLError as error:
        raise DeploymentError(
            f"superlink.address: TLS to {config.superlink.address} failed: "
            f"{getattr(error, 'reason', None) or error} (is superlink.ca_cert the consortium CA?)"
        ) from None
    except OSError as error:
        raise DeploymentError(
            f"superlink.address: cannot reach {config.superlink.address}: {error.strerror or error}"
        ) from None
