"""``node.yaml``: the configuration of one hospital's inference server.

Hospital IT edits this file, so it is validated like an experiment YAML: unknown keys and bad
values are one ``ConfigError`` naming the key, the value and what was expected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from fedllm.config.loading import read_yaml, validate_model
from fedllm.config.schema import ModelConfig, StrictModel
from fedllm.serving.http_limits import ServerLimits
from fedllm.serving.schemas import MAX_PROMPT_CHARS, MAX_TOKENS_LIMIT
from fedllm.telemetry.tracing import TracingConfig

Identifier = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]


class TlsConfig(StrictModel):
    """Server certificate and key; ``client_ca_file`` turns on mutual TLS (client certificates
    signed by that CA are then required)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _files_exist(self) -> TlsConfig:
        for path in (self.cert_file, self.key_file, self.client_ca_file):
            if path is not None and not path.is_file():
                raise ValueError(f"file not found: {path}")
        return self


class NodeLedgerConfig(StrictModel):
    """The hospital's privacy ledger, charged for consensus votes (same database as training)."""

    url: str = Field(min_length=1)
    epsilon_cap: PositiveFloat
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    accountant: Literal["pld", "rdp", "prv"] = "pld"


class NodeLimits(ServerLimits):
    """This node's request limits (stricter than or equal to the protocol's ceilings)."""

    max_prompt_chars: int = Field(8000, ge=1, le=MAX_PROMPT_CHARS)
    max_tokens: int = Field(256, ge=1, le=MAX_TOKENS_LIMIT)


class NodeConsensusConfig(StrictModel):
    """What this node accepts when the router opens a consensus session.

    ``min_noise_multiplier`` is the floor on σ/√2, the noise the node adds to each ballot in
    units of its sensitivity √2: a session asking for less is refused (HTTP 422) before the
    ledger is charged, so no caller can buy near-raw votes. ``insecure_loopback`` lets a node
    answer consensus calls without client certificates, only on a loopback address (tests and
    single-machine trials); the node warns on every start.
    """

    min_noise_multiplier: float = Field(2.0, gt=0.0, le=1e6, allow_inf_nan=False)
    insecure_loopback: bool = False


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (so no other machine can reach the port)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NodeServerConfig(StrictModel):
    """One hospital inference server: what it serves, where, and how it accounts privacy."""

    node_id: Identifier
    hospital_id: Identifier
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535)
    # Plain-HTTP port answering only GET /v1/ready, for an orchestrator's probes: a Kubernetes
    # kubelet cannot present a client certificate to the mutual-TLS port. Off when null.
    probe_port: int | None = Field(None, ge=1, le=65535)
    backend: Literal["model", "constant"] = "model"
    model: ModelConfig = ModelConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    adapter_dir: Path | None = None
    # Serve a global adapter without a valid DP record: its answers then carry no DP guarantee,
    # so this is off unless an operator explicitly turns it on (warned at start-up).
    allow_non_dp_adapters: bool = False
    local_adapter: Path | None = None
    reload_interval_s: PositiveFloat = 5.0
    specialisations: list[str] = Field(default_factory=list)
    tls: TlsConfig | None = None
    ledger: NodeLedgerConfig | None = None
    limits: NodeLimits = NodeLimits()
    consensus: NodeConsensusConfig = NodeConsensusConfig()
    session_ttl_s: PositiveFloat = 600.0
    max_sessions: PositiveInt = 10_000
    # OpenTelemetry traces over OTLP/HTTP; off (no exporter at all) unless this is set.
    tracing: TracingConfig | None = None

    @model_validator(mode="after")
    def _local_adapter_exists(self) -> NodeServerConfig:
        if self.local_adapter is not None and not self.local_adapter.is_dir():
            raise ValueError(f"local_adapter directory not found: {self.local_adapter}")
        return self

    @property
    def authenticates_clients(self) -> bool:
        """Whether only holders of a consortium client certificate can call this node."""
        return self.tls is not None and self.tls.client_ca_file is not None

    @model_validator(mode="after")
    def _consensus_needs_client_auth(self) -> NodeServerConfig:
        """Consensus spends the hospital's ε: only the consortium's router may ask for it."""
        if self.ledger is None or self.authenticates_clients:
            return self
        if not self.consensus.insecure_loopback:
            raise ValueError(
                "consensus is enabled (ledger is set) but callers are not authenticated: set "
                "tls.client_ca_file (mutual TLS, only the consortium's router may call), or "
                "remove ledger to disable consensus, or set consensus.insecure_loopback: true "
                "for a loopback-only trial"
            )
        if not is_loopback(self.host):
            raise ValueError(
                f"consensus.insecure_loopback needs a loopback host, got host {self.host!r}: "
                "set tls.client_ca_file to serve consensus to other machines"
            )
        return self


def load_node_config(path: str | Path) -> NodeServerConfig:
    """Read and validate ``node.yaml``. Relative paths, like an experiment's ``output_dir``,
    are relative to the directory the server is started from."""
    return validate_node_config(read_yaml(path), source=str(path))


def validate_node_config(raw: Mapping[str, Any], source: str = "node config") -> NodeServerConfig:
    """Validate a raw mapping, rewording pydantic's errors as 'key: got value; expected ...'."""
    return validate_model(NodeServerConfig, raw, source, what="node config")
