"""The router's YAML schema (`fedllm router --config router.yaml`).

The router is the only component facing clinicians, so its configuration is where security
defaults live: TLS is required unless an operator writes ``insecure: true`` (loopback
development only), signing keys are read from files or environment variables and never from
the YAML itself, and unknown keys are rejected so a misspelt limit can never silently fall
back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from fedllm.config.loading import read_yaml, validate_model
from fedllm.config.schema import StrictModel
from fedllm.serving.http_limits import ServerLimits
from fedllm.telemetry.tracing import TracingConfig

RoutingPolicyName = Literal["least-busy", "latency", "specialisation", "privacy-aware"]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

# Upper bounds keep every value representable where it ends up: quotas are stored in micro-ε
# as 64-bit integers, TTLs and periods become timestamps, cache sizes become allocations.
MAX_QUOTA_EPSILON = 1_000_000.0
MAX_PERIOD_S = 10 * 365 * 24 * 3600.0
MAX_TIMEOUT_S = 3600.0
MAX_CACHE_ENTRIES = 1_000_000
MAX_CACHE_TTL_S = 7 * 24 * 3600.0
MAX_NAME_CHARS = 255

Quota = Annotated[float, Field(ge=0, le=MAX_QUOTA_EPSILON, allow_inf_nan=False)]
QuotaName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
CacheEntries = Annotated[int, Field(ge=0, le=MAX_CACHE_ENTRIES)]
CacheTtl = Annotated[float, Field(ge=0, le=MAX_CACHE_TTL_S, allow_inf_nan=False)]


def check_node_url(url: str) -> str:
    """An http(s) URL with a host and nothing that would be silently dropped or misread.

    ``https://`` alone would otherwise fall back to 127.0.0.1:443, and credentials, queries or
    fragments in a node URL are never what an operator meant.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"not a valid URL ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("must name a host, e.g. https://node-a.hospital.example:8081")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials")
    if parts.query or parts.fragment:
        raise ValueError("must not contain a query or fragment")
    if port == 0:
        raise ValueError("port 0 is not a valid node port")
    return url


class ListenConfig(StrictModel):
    """Where the router accepts connections (loopback unless the operator opens it up)."""

    host: str = "127.0.0.1"
    port: int = Field(8443, ge=0, le=65535)


class TLSConfig(StrictModel):
    """The router's own server certificate (clients verify it)."""

    cert_file: str
    key_file: str


class DatabaseConfig(StrictModel):
    """SQLAlchemy URL of the users and per-user/department budget tables."""

    url: str = "sqlite:///router.db"


class TrustedIssuerConfig(StrictModel):
    """An external identity provider whose tokens the router accepts (public key only)."""

    issuer: str
    public_key_file: str
    algorithms: list[str] = Field(default_factory=lambda: ["EdDSA"], min_length=1)


class AuthConfig(StrictModel):
    """Token issuing (router's own key) and verification (own key + trusted issuers)."""

    issuer: str = "fedllm-router"
    audience: str = "fedllm"
    signing_key_file: str | None = None
    signing_key_env: str | None = None
    token_ttl_s: PositiveInt = 900
    algorithm: Literal["EdDSA", "ES256", "ES384", "RS256", "PS256"] = "EdDSA"
    trusted_issuers: list[TrustedIssuerConfig] = Field(default_factory=list)
    max_failed_logins: PositiveInt = 5
    lockout_s: PositiveFloat = 900.0
    # argon2 runs on its own pool: this many threads (default: half the CPUs, 1 to 4) ...
    password_workers: PositiveInt | None = None
    # ... and at most this many logins waiting for one; beyond that, 503 with Retry-After.
    password_queue: int = Field(16, ge=0, le=10_000)

    @model_validator(mode="after")
    def _one_key_source(self) -> AuthConfig:
        if (self.signing_key_file is None) == (self.signing_key_env is None):
            raise ValueError("set exactly one of signing_key_file or signing_key_env")
        return self


class RateLimitConfig(StrictModel):
    """Token buckets: per authenticated user; for logins, per client address and per username
    (a login must pass both, so neither many addresses nor many names buy unlimited tries)."""

    requests_per_s: PositiveFloat = 20.0
    burst: PositiveInt = 40
    login_per_s: PositiveFloat = 0.5
    login_burst: PositiveInt = 5
    login_user_per_s: PositiveFloat = 0.2
    login_user_burst: PositiveInt = 10


class BudgetConfig(StrictModel):
    """Per-user and per-department ε quotas, refreshed every period, on top of hospital caps."""

    user_quota: Quota = 1.0
    department_quota: Quota = 10.0
    period_s: float = Field(30 * 24 * 3600.0, gt=0, le=MAX_PERIOD_S, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["pld", "rdp", "prv"] = "pld"
    quota_overrides: dict[QuotaName, Quota] = Field(default_factory=dict)


class NodeConfig(StrictModel):
    """A hospital inference server the router may send requests to."""

    node_id: str = Field(pattern=_NAME, max_length=128)
    url: Annotated[str, Field(max_length=2048), AfterValidator(check_node_url)]
    specialisations: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]] = Field(
        default_factory=list, max_length=64
    )
    # The hospital whose ledger this node charges; checked against what the node reports.
    # Consensus counts one ballot per hospital, so two nodes of one hospital never both vote.
    hospital_id: str | None = Field(None, pattern=_NAME)


class NodeTLSConfig(StrictModel):
    """How the router verifies nodes (CA) and, for mutual TLS, proves itself to them."""

    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None

    @model_validator(mode="after")
    def _cert_with_key(self) -> NodeTLSConfig:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together")
        return self


class RoutingConfig(StrictModel):
    """Which node serves a request, how often to retry, and how nodes are health-checked."""

    policy: RoutingPolicyName = "least-busy"
    retries: int = Field(2, ge=0, le=10)
    timeout_s: float = Field(30.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    health_interval_s: float = Field(5.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    ewma_alpha: float = Field(0.2, gt=0, le=1)
    unhealthy_after_failures: PositiveInt = 3


class CacheConfig(StrictModel):
    """Per-user cache of deterministic (temperature 0, non-consensus) answers."""

    max_entries: CacheEntries = 1024
    ttl_s: CacheTtl = 60.0


class ConsensusConfig(StrictModel):
    """GNMax consensus across hospitals: noise on vote counts, candidates, quorum."""

    vote_noise_std: PositiveFloat = 4.0
    top_k: int = Field(5, ge=2, le=100)
    min_nodes: PositiveInt = 2
    max_nodes: PositiveInt | None = None
    threshold: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _max_at_least_min(self) -> ConsensusConfig:
        if self.max_nodes is not None and self.max_nodes < self.min_nodes:
            raise ValueError("max_nodes must be >= min_nodes")
        return self


class AuditConfig(StrictModel):
    """HMAC-chained audit log; prompts are stored only as HMAC digests under this key, which
    also keys the chain (under a derived key)."""

    path: str = "router-audit.jsonl"
    redaction_key_file: str | None = None
    redaction_key_env: str | None = None
    # Unauthenticated failures are written as one counted entry per kind and client per window.
    failure_window_s: float = Field(60.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _one_key_source(self) -> AuditConfig:
        if (self.redaction_key_file is None) == (self.redaction_key_env is None):
            raise ValueError("set exactly one of redaction_key_file or redaction_key_env")
        return self


class LimitsConfig(ServerLimits):
    """Guards against oversized, slow or too many requests (the server side: see
    `ServerLimits`), and the connection pool to each node (``max_connections``,
    ``max_keepalive_connections``)."""

    max_request_bytes: int = Field(256 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_incoming_connections: int = Field(1024, ge=1, le=100_000)
    max_connections: int = Field(200, ge=1, le=10_000)
    max_keepalive_connections: int = Field(50, ge=1, le=10_000)


class AlertsConfig(StrictModel):
    """Unusual-consumption alert conditions, evaluated every ``interval_s`` by each replica and
    exported as ``fedllm_router_alert_*`` gauges (1 while the condition holds) with an audit
    entry each time one starts to hold.

    - unusual spending: a user charged at least ``spending_min_epsilon`` in the last
      ``spending_window_s`` and more than ``spending_factor`` times their own average per
      window over the ``spending_baseline_windows`` windows before (read from the shared
      budget database, so every replica sees every replica's charges);
    - refused burst: more than ``refused_threshold`` consensus requests refused for quota
      (HTTP 403) by this replica within ``refused_window_s``;
    - auth failures: more than ``auth_failures_threshold`` refused logins or tokens at this
      replica within ``auth_failures_window_s``.
    """

    enabled: bool = True
    interval_s: float = Field(30.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    spending_window_s: float = Field(86_400.0, gt=0, le=MAX_PERIOD_S, allow_inf_nan=False)
    spending_baseline_windows: int = Field(7, ge=1, le=365)
    spending_factor: float = Field(5.0, gt=0, le=1e6, allow_inf_nan=False)
    spending_min_epsilon: Quota = 0.5
    refused_window_s: float = Field(300.0, gt=0, le=MAX_PERIOD_S, allow_inf_nan=False)
    refused_threshold: int = Field(20, ge=0, le=1_000_000)
    auth_failures_window_s: float = Field(300.0, gt=0, le=MAX_PERIOD_S, allow_inf_nan=False)
    auth_failures_threshold: int = Field(20, ge=0, le=1_000_000)


class RouterConfig(StrictModel):
    """Everything `fedllm router` needs."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    tls: TLSConfig | None = None
    insecure: bool = False
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    auth: AuthConfig
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    budgets: BudgetConfig = Field(default_factory=BudgetConfig)
    nodes: list[NodeConfig] = Field(default_factory=list)
    node_tls: NodeTLSConfig | None = None
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    consensus: ConsensusConfig = Field(default_factory=ConsensusConfig)
    audit: AuditConfig
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    # OpenTelemetry traces over OTLP/HTTP; off (no exporter at all) unless this is set.
    tracing: TracingConfig | None = None

    @model_validator(mode="after")
    def _tls_or_insecure(self) -> RouterConfig:
        if self.tls is None and not self.insecure:
            raise ValueError("tls.cert_file and tls.key_file are required (or insecure: true)")
        ids = [node.node_id for node in self.nodes]
        duplicates = sorted({node_id for node_id in ids if ids.count(node_id) > 1})
        if duplicates:
            raise ValueError(f"duplicate node_id {duplicates}")
        plain = [node.node_id for node in self.nodes if not node.url.startswith("https://")]
        if self.node_tls is not None and self.node_tls.client_cert_file and plain:
            raise ValueError(
                f"nodes {plain} use plain http:// but node_tls has a client certificate "
                "(mutual TLS): use https:// for every node"
            )
        return self


def load_router_config(path: str | Path) -> RouterConfig:
    """Read and validate ``path``; every user mistake becomes one ConfigError."""
    return validate_model(RouterConfig, read_yaml(path), str(path), what="router config")
