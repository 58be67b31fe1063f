"""The schema of ``hospital.yaml``: everything a hospital's IT needs to join a federation.

One file per hospital, filled in from ``configs/hospital.yaml`` without reading code. It names
the hospital (as the researcher's experiment lists it), where the consortium's SuperLink is and
the certificate that proves it, the hospital's SuperNode authentication key, its own records
file, where its privacy ledger lives and its ε cap, and optionally its inference server (the
``inference`` section is a ``node.yaml``, :class:`fedllm.serving.node.config.NodeServerConfig`).
Relative paths (a relative SQLite ledger path included) are resolved against the directory of
the YAML file, so the file and the credentials it points to can be moved together.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveFloat, model_validator

from fedllm.config.loading import read_yaml, validate_model
from fedllm.config.schema import StrictModel
from fedllm.serving.node.config import NodeServerConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
SQLITE_URL_KEYS = ("privacy.ledger_url", "inference.ledger.url")
PATH_KEYS = (
    "superlink.ca_cert",
    "auth.private_key",
    "auth.public_key",
    "data.path",
    "privacy.split_key_file",
    "runtime.state_dir",
    "inference.adapter_dir",
    "inference.local_adapter",
    "inference.tls.cert_file",
    "inference.tls.key_file",
    "inference.tls.client_ca_file",
    *SQLITE_URL_KEYS,
)
ADDRESS_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}$"


class SuperLinkSection(StrictModel):
    """Where the consortium's SuperLink listens and how to know it is the real one."""

    address: str = Field(pattern=ADDRESS_PATTERN)
    ca_cert: Path | None = None
    insecure: bool = False

    @model_validator(mode="after")
    def _tls_or_explicitly_insecure(self) -> SuperLinkSection:
        if not self.insecure and self.ca_cert is None:
            raise ValueError(
                "superlink.ca_cert is required (the consortium CA certificate, ca.crt); "
                "set superlink.insecure: true only for a local test"
            )
        if self.insecure and self.ca_cert is not None:
            raise ValueError("superlink.insecure: true cannot be combined with superlink.ca_cert")
        return self


class AuthSection(StrictModel):
    """The SuperNode authentication key pair (OpenSSH EC keys, from ``fedllm certs``).

    The private key never leaves the hospital; the public key is what the operator registers.
    """

    private_key: Path
    public_key: Path | None = None


class DataSection(StrictModel):
    """The hospital's own training records: a JSONL or CSV export, one record per line/row."""

    path: Path
    format: Literal["jsonl", "csv"] | None = None
    text_field: str = "text"
    specialty_field: str | None = None
    patient_field: str | None = None

    def resolved_format(self) -> Literal["jsonl", "csv"]:
        """The explicit format, else the file extension's."""
        if self.format is not None:
            return self.format
        return "csv" if self.path.suffix.lower() == ".csv" else "jsonl"


class PrivacySection(StrictModel):
    """Where the hospital's privacy ledger lives, the ε it will never exceed, and its secrets.

    ``split_key_file`` holds the secret that decides, per patient id, which patients are held
    out for evaluation (created on first start; by default ``split.key`` beside a SQLite
    ledger; keep it with the ledger: a new key would move patients between the sides).
    ``evaluation: off`` refuses every evaluation request, so the hospital releases nothing
    about its held-out patients; ``dp`` releases a noised, charged loss.
    """

    ledger_url: str
    epsilon_cap: PositiveFloat | None = None
    split_key_file: Path | None = None
    evaluation: Literal["dp", "off"] = "dp"


class RuntimeSection(StrictModel):
    """Local settings of the SuperNode process (defaults suit one SuperNode per machine).

    ``warm_worker`` (on by default) runs the SuperNode in process isolation and starts a
    long-lived worker beside it that claims every ClientApp task from the SuperNode's Runtime
    API (127.0.0.1, ``clientapp_port``) and keeps the base model loaded across rounds. Off,
    Flower starts a process per message, which rebuilds the hospital's site and reloads the
    model.
    """

    state_dir: Path = Path("fedllm-state")
    clientapp_port: int = Field(9094, ge=1, le=65535)
    max_retries: int | None = Field(None, ge=0)
    max_wait_s: PositiveFloat | None = None
    warm_worker: bool = True


class HospitalConfig(StrictModel):
    """A hospital's deployment: one SuperNode (and optionally its inference server)."""

    hospital: str = Field(pattern=NAME_PATTERN)
    superlink: SuperLinkSection
    auth: AuthSection | None = None
    data: DataSection
    privacy: PrivacySection
    runtime: RuntimeSection = RuntimeSection()
    inference: NodeServerConfig | None = None

    @model_validator(mode="after")
    def _auth_needs_tls(self) -> HospitalConfig:
        if self.superlink.insecure and self.auth is not None:
            raise ValueError(
                "auth cannot be used with superlink.insecure: true "
                "(SuperNode authentication needs TLS)"
            )
        if not self.superlink.insecure and self.auth is None:
            raise ValueError(
                "auth.private_key is required: the SuperLink only accepts registered SuperNodes"
            )
        if self.inference is not None:
            if self.inference.hospital_id != self.hospital:
                raise ValueError(
                    f"inference.hospital_id ({self.inference.hospital_id!r}) must be the "
                    f"hospital ({self.hospital!r}): consensus votes charge its ledger"
                )
            ledger = self.inference.ledger
            if ledger is not None and ledger.url != self.privacy.ledger_url:
                raise ValueError(
                    f"inference.ledger.url ({ledger.url!r}) must be privacy.ledger_url "
                    f"({self.privacy.ledger_url!r}): training and consensus spend one budget"
                )
        return self


def load_hospital_config(path: str | Path) -> HospitalConfig:
    """Read and validate ``hospital.yaml``; relative paths become relative to its directory."""
    file = Path(path)
    raw = resolve_relative_paths(read_yaml(file), file.resolve().parent)
    return validate_model(HospitalConfig, raw, str(file), what="hospital config")


def resolve_relative_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the file and SQLite paths of a raw ``hospital.yaml`` absolute against ``base``.

    Done before validation, so that checks for existing files (the inference server's TLS
    files) look where the IT person meant, whatever directory the command runs from.
    """
    resolved = copy.deepcopy(raw)
    for dotted in PATH_KEYS:
        *parents, leaf = dotted.split(".")
        section = resolved
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or not isinstance(section.get(leaf), str):
            continue
        value = section[leaf]
        if dotted in SQLITE_URL_KEYS:
            if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
                section[leaf] = f"sqlite:///{base / value.removeprefix('sqlite:///')}"
            continue
        candidate = Path(value).expanduser()
        section[leaf] = str(candidate if candidate.is_absolute() else base / candidate)
    return resolved
