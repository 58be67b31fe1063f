"""The consortium's credentials: one private CA and every certificate and key a deployment needs.

A federation across hospitals needs TLS everywhere (SuperLink ↔ SuperNodes, router ↔ inference
servers, clients ↔ router), SuperNode authentication keys, and the router's token signing key.
Issuing them from one consortium CA means each party trusts exactly one file (``ca/ca.crt``) and
nothing from a public CA can impersonate a member.

Layout under the output directory (directories 0700, private keys 0600, certificates 0644)::

    ca/ca.crt, ca/ca.key                      consortium CA (keep ca.key offline)
    superlink/server.crt, superlink/server.key  SuperLink TLS (Fleet, Control, AppIO APIs)
    supernodes/<hospital>/auth_key            SuperNode authentication key, OpenSSH EC private key
    supernodes/<hospital>/auth_key.pub        the same key's public half, OpenSSH format
    nodes/<hospital>/server.crt, server.key   the hospital's inference server TLS
    router/server.crt, router/server.key      the router's TLS for clinicians' clients
    router/client.crt, router/client.key      the router's client certificate (mTLS to the nodes)
    router/jwt_private.pem, jwt_public.pem    Ed25519 key pair signing the router's access tokens

The SuperNode key formats are the ones Flower 1.42 reads: ``flower-supernode
--auth-supernode-private-key`` loads an OpenSSH EC private key (``load_ssh_private_key``) and
``flwr supernode register`` loads an OpenSSH EC public key on a NIST curve.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedllm.security.tokens import generate_ed25519_keypair
from fedllm.storage.files import write_atomic

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
DEFAULT_CA_DAYS = 3650
EXPIRY_WARNING_DAYS = 30
ORGANISATION = "fedllm consortium"

_HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DNS_NAME = re.compile(
    r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# Certificates start a little in the past so that a peer whose clock lags does not reject them.
_CLOCK_SKEW = timedelta(minutes=5)


class CredentialsError(Exception):
    """A user mistake about credentials (existing CA, unknown hospital, bad host name)."""


@dataclass(frozen=True)
class Credentials:
    """Where every credential of a deployment lives on disk."""

    root: Path
    ca_cert: Path
    ca_key: Path
    superlink_cert: Path
    superlink_key: Path
    supernode_keys: dict[str, tuple[Path, Path]]
    router_cert: Path
    router_key: Path
    router_client_cert: Path
    router_client_key: Path
    node_server_certs: dict[str, tuple[Path, Path]]
    jwt_private_key: Path
    jwt_public_key: Path
    audit_key: Path

    def files(self) -> list[tuple[str, Path]]:
        """Every file with a short description of what it is for, in a stable order."""
        entries = [
            ("consortium CA certificate (public: give to every party)", self.ca_cert),
            ("consortium CA private key (keep offline)", self.ca_key),
            ("SuperLink TLS certificate", self.superlink_cert),
            ("SuperLink TLS private key", self.superlink_key),
        ]
        for hospital, (private, public) in sorted(self.supernode_keys.items()):
            entries.append((f"{hospital}: SuperNode authentication private key", private))
            entries.append((f"{hospital}: SuperNode authentication public key", public))
        for hospital, (cert, key) in sorted(self.node_server_certs.items()):
            entries.append((f"{hospital}: inference server TLS certificate", cert))
            entries.append((f"{hospital}: inference server TLS private key", key))
        entries += [
            ("router TLS certificate", self.router_cert),
            ("router TLS private key", self.router_key),
            ("router client certificate (mTLS to the nodes)", self.router_client_cert),
            ("router client private key", self.router_client_key),
            ("router JWT signing key (Ed25519)", self.jwt_private_key),
            ("router JWT verification key (Ed25519)", self.jwt_public_key),
            ("router audit-log redaction key (HMAC)", self.audit_key),
        ]
        return entries


@dataclass(frozen=True)
class CredentialProblem:
    """One finding of :func:`check_credentials`."""

    path: Path
    kind: str  # "expiring", "expired", "permissions", "missing", "invalid"
    message: str


@dataclass(frozen=True)
class CertificateStatus:
    """A certificate found by :func:`check_credentials` and when it stops being valid."""

    path: Path
    subject: str
    expires_at: datetime
    days_left: float


@dataclass(frozen=True)
class CredentialsReport:
    """What :func:`check_credentials` found: every certificate and every problem."""

    certificates: list[CertificateStatus] = field(default_factory=list)
    problems: list[CredentialProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def layout(out: Path, hospitals: Sequence[str]) -> Credentials:
    """The paths a credentials directory uses, whether or not the files exist yet."""
    root = Path(out)
    return Credentials(
        root=root,
        ca_cert=root / "ca" / "ca.crt",
        ca_key=root / "ca" / "ca.key",
        superlink_cert=root / "superlink" / "server.crt",
        superlink_key=root / "superlink" / "server.key",
        supernode_keys={
            name: (
                root / "supernodes" / name / "auth_key",
                root / "supernodes" / name / "auth_key.pub",
            )
            for name in hospitals
        },
        router_cert=root / "router" / "server.crt",
        router_key=root / "router" / "server.key",
        router_client_cert=root / "router" / "client.crt",
        router_client_key=root / "router" / "client.key",
        node_server_certs={
            name: (root / "nodes" / name / "server.crt", root / "nodes" / name / "server.key")
            for name in hospitals
        },
        jwt_private_key=root / "router" / "jwt_private.pem",
        jwt_public_key=root / "router" / "jwt_public.pem",
        audit_key=root / "router" / "audit.key",
    )


def init_credentials(
    out: Path,
    *,
    hospitals: Sequence[str],
    superlink_hosts: Sequence[str] = DEFAULT_HOSTS,
    router_hosts: Sequence[str] = DEFAULT_HOSTS,
    node_hosts: Mapping[str, Sequence[str]] | None = None,
    days: int = DEFAULT_DAYS,
    ca_days: int = DEFAULT_CA_DAYS,
    force: bool = False,
) -> Credentials:
    """Create a new consortium CA and every credential of a deployment under ``out``.

    ``node_hosts`` maps a hospital to the host names of its inference server (default
    ``localhost``/``127.0.0.1``). The CA lives longer than the leaves (``ca_days``) so that leaf
    certificates can be renewed without redistributing ``ca.crt``. An existing CA is never
    replaced unless ``force``: replacing it silently would cut every party off the federation.
    """
    names = _validate_hospitals(hospitals)
    if not names:
        raise CredentialsError("at least one hospital is needed (--hospital NAME)")
    _validate_days(days, ca_days)
    node_hosts = dict(node_hosts or {})
    unknown = sorted(set(node_hosts) - set(names))
    if unknown:
        raise CredentialsError(f"node hosts given for unknown hospitals: {', '.join(unknown)}")
    creds = layout(out, names)
    if (creds.ca_key.exists() or creds.ca_cert.exists()) and not force:
        raise CredentialsError(
            f"a CA already exists in {creds.root}; use add-hospital to extend it, "
            "or --force to replace it (every party then needs the new ca.crt)"
        )
    _make_private_dirs(creds)

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, now, ca_days)
    _write_key(creds.ca_key, ca_key)
    _write_cert(creds.ca_cert, ca_cert)

    issuer = _Issuer(ca_cert, ca_key, now, days)
    issuer.server(creds.superlink_cert, creds.superlink_key, "fedllm-superlink", superlink_hosts)
    issuer.server(creds.router_cert, creds.router_key, "fedllm-router", router_hosts)
    issuer.client(creds.router_client_cert, creds.router_client_key, "fedllm-router")
    _write_router_secrets(creds)
    for name in names:
        _issue_hospital(creds, issuer, name, node_hosts.get(name, DEFAULT_HOSTS))
    return creds


def add_hospital(
    out: Path,
    name: str,
    *,
    node_hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> Credentials:
    """Issue the credentials of a hospital joining later, signed by the existing CA."""
    (name,) = _validate_hospitals([name])
    _validate_days(days, DEFAULT_CA_DAYS)
    creds = load_credentials(out)
    if name in creds.supernode_keys and not force:
        raise CredentialsError(
            f"hospital {name!r} already has credentials in {creds.root}; use --force to reissue"
        )
    ca_cert, ca_key = _load_ca(creds)
    now = datetime.now(UTC)
    if ca_cert.not_valid_after_utc <= now:
        raise CredentialsError(f"the CA in {creds.ca_cert} has expired; create a new one")
    joining = layout(out, [name])
    _make_private_dirs(joining)
    _issue_hospital(joining, _Issuer(ca_cert, ca_key, now, days), name, node_hosts)
    return load_credentials(out)


def renew_certificates(out: Path, *, days: int = DEFAULT_DAYS) -> list[Path]:
    """Re-sign every leaf certificate for ``days`` more, keeping its key, names and usages.

    Renewal changes only the ``.crt`` files: private keys, SuperNode keys (and so their
    registration with the SuperLink) and ``ca.crt`` stay as they are, so each party only
    needs its new certificate. Returns the renewed paths.
    """
    _validate_days(days, DEFAULT_CA_DAYS)
    creds = load_credentials(out)
    ca_cert, ca_key = _load_ca(creds)
    now = datetime.now(UTC)
    if ca_cert.not_valid_after_utc <= now:
        raise CredentialsError(f"the CA in {creds.ca_cert} has expired; create a new one")
    issuer = _Issuer(ca_cert, ca_key, now, days)
    paths = [
        creds.superlink_cert,
        creds.router_cert,
        creds.router_client_cert,
        *(cert for cert, _ in creds.node_server_certs.values()),
    ]
    paths = [path for path in paths if path.is_file()]
    for path in paths:
        issuer.reissue(path)
    return paths


def load_credentials(out: Path) -> Credentials:
    """The credentials under ``out``; hospitals are those with a SuperNode or server directory."""
    root = Path(out)
    ca_cert = root / "ca" / "ca.crt"
    if not ca_cert.is_file():
        raise CredentialsError(
            f"no credentials in {root} (missing {ca_cert}); run `fedllm certs init`"
        )
    hospitals: set[str] = set()
    for kind in ("supernodes", "nodes"):
        if (root / kind).is_dir():
            hospitals.update(p.name for p in (root / kind).iterdir() if p.is_dir())
    return layout(root, sorted(hospitals))


# What one hospital's IT needs, under the names configs/hospital.yaml expects: (file in the
# bundle, its mode). The SuperNode's key pair and the inference server's TLS pair are private.
HOSPITAL_BUNDLE_MODES = {
    "ca.crt": 0o644,
    "auth_key": 0o600,
    "auth_key.pub": 0o644,
    "node.crt": 0o644,
    "node.key": 0o600,
}


def hospital_bundle(out: Path, hospital: str, target: Path, *, force: bool = False) -> list[Path]:
    """Copy everything `hospital` needs from the operator's credentials into `target` (0700).

    The names are the ones the hospital template (``configs/hospital.yaml``) expects, so the
    operator sends one directory and hospital IT points ``credentials/`` at it. The CA key, the
    router's keys and other hospitals' files never go in. Refuses to overwrite unless `force`.
    """
    creds = load_credentials(out)
    (name,) = _validate_hospitals([hospital])
    if name not in creds.supernode_keys or name not in creds.node_server_certs:
        raise CredentialsError(
            f"no credentials for hospital {name!r} in {creds.root}; issue them with "
            "`fedllm certs add-hospital`"
        )
    private_key, public_key = creds.supernode_keys[name]
    server_cert, server_key = creds.node_server_certs[name]
    sources = {
        "ca.crt": creds.ca_cert,
        "auth_key": private_key,
        "auth_key.pub": public_key,
        "node.crt": server_cert,
        "node.key": server_key,
    }
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        raise CredentialsError(f"missing in {creds.root}: {', '.join(missing)}")
    target = Path(target)
    existing = [target / file for file in sources if (target / file).exists()]
    if existing and not force:
        raise CredentialsError(
            f"{existing[0]} already exists; pass --force to replace the bundle in {target}"
        )
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(target, 0o700)
    written = []
    for file, source in sources.items():
        write_atomic(target / file, source.read_bytes(), mode=HOSPITAL_BUNDLE_MODES[file])
        written.append(target / file)
    return written


def certificate_expiry(path: Path) -> datetime:
    """When the PEM certificate at ``path`` stops being valid (timezone-aware, UTC)."""
    return _read_cert(Path(path)).not_valid_after_utc


def check_credentials(out: Path, *, warn_days: int = EXPIRY_WARNING_DAYS) -> CredentialsReport:
    """Find what would break a deployment soon: expiring certificates, loose permissions.

    Only the files present are checked, so the same check runs on the operator's full
    directory and on a party's machine holding just its own files and ``ca/ca.crt`` (the CA key
    is meant to be offline). Every certificate is also checked against the CA and against its
    private key, and every SuperNode key against its public key, because a mismatched pair
    only fails at the handshake.
    """
    creds = load_credentials(out)
    report = CredentialsReport()
    now = datetime.now(UTC)
    ca_cert = _read_cert(creds.ca_cert)
    _check_certificate(report, ca_cert, creds.ca_cert, now, warn_days)
    _check_private_key(report, creds.ca_key, ca_cert)
    pairs = [
        (creds.superlink_cert, creds.superlink_key),
        (creds.router_cert, creds.router_key),
        (creds.router_client_cert, creds.router_client_key),
        *creds.node_server_certs.values(),
    ]
    for cert_path, key_path in pairs:
        if cert_path.is_file() != key_path.is_file():
            missing = key_path if cert_path.is_file() else cert_path
            report.problems.append(
                CredentialProblem(missing, "missing", "the other half of its pair is present")
            )
        if cert_path.is_file():
            cert = _check_certificate(report, ca_cert, cert_path, now, warn_days)
            if cert is not None:
                _check_private_key(report, key_path, cert)
    for private_path, public_path in creds.supernode_keys.values():
        _check_supernode_key(report, private_path, public_path)
    _check_private_mode(report, creds.jwt_private_key)
    _check_private_mode(report, creds.audit_key)
    for directory in [creds.root, *(p for p in creds.root.rglob("*") if p.is_dir())]:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & 0o077:
            report.problems.append(
                CredentialProblem(
                    directory, "permissions", f"directory mode {mode:o}; expected 700"
                )
            )
    return report


def load_ssh_supernode_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a SuperNode authentication key as ``flower-supernode`` does (OpenSSH, EC)."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), None)
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialsError(f"{path} is not an OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{path} is not an EC private key")
    return key


class _Issuer:
    """Signs leaf certificates with the CA; one validity window for a whole issuance."""

    def __init__(
        self,
        ca_cert: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
        now: datetime,
        days: int,
    ) -> None:
        self._ca_cert = ca_cert
        self._ca_key = ca_key
        self._not_before = now - _CLOCK_SKEW
        # A leaf must not outlive its CA: verifiers would reject it after the CA expires anyway.
        self._not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)

    def server(
        self, cert_path: Path, key_path: Path, common_name: str, hosts: Sequence[str]
    ) -> None:
        names = _subject_alternative_names(hosts)
        self._leaf(cert_path, key_path, common_name, ExtendedKeyUsageOID.SERVER_AUTH, names)

    def client(self, cert_path: Path, key_path: Path, common_name: str) -> None:
        self._leaf(cert_path, key_path, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, None)

    def reissue(self, cert_path: Path) -> None:
        old = _read_cert(cert_path)
        try:
            old.verify_directly_issued_by(self._ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise CredentialsError(f"{cert_path} was not issued by this CA") from None
        builder = (
            x509.CertificateBuilder()
            .subject_name(old.subject)
            .issuer_name(self._ca_cert.subject)
            .public_key(old.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
        )
        for extension in old.extensions:
            builder = builder.add_extension(extension.value, critical=extension.critical)
        _write_cert(cert_path, builder.sign(self._ca_key, hashes.SHA384()))

    def _leaf(
        self,
        cert_path: Path,
        key_path: Path,
        common_name: str,
        usage: x509.ObjectIdentifier,
        names: list[x509.GeneralName] | None,
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            # Server certificates cannot act as clients and vice versa: a hospital's server
            # certificate must not let it pose as the router towards other hospitals.
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA384())
        _write_key(key_path, key)
        _write_cert(cert_path, cert)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime, days: int) -> x509.Certificate:
    name = _name("fedllm consortium CA")
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        # path_length=0: the CA signs leaves only, never an intermediate that could sign more.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _issue_hospital(creds: Credentials, issuer: _Issuer, name: str, hosts: Sequence[str]) -> None:
    private_path, public_path = creds.supernode_keys[name]
    # P-384 as in Flower's own docs (`ssh-keygen -t ecdsa -b 384`); OpenSSH encoding because
    # flower-supernode reads the key with load_ssh_private_key.
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_atomic(private_path, private, mode=0o600)
    write_atomic(public_path, public + b"\n", mode=0o644)
    cert_path, key_path = creds.node_server_certs[name]
    issuer.server(cert_path, key_path, f"fedllm-node-{name}", hosts)


def _write_router_secrets(creds: Credentials) -> None:
    """The router's token-signing key pair and the key that redacts prompts in its audit log."""
    private, public = generate_ed25519_keypair()
    write_atomic(creds.jwt_private_key, private, mode=0o600)
    write_atomic(creds.jwt_public_key, public, mode=0o644)
    write_atomic(creds.audit_key, secrets.token_hex(32).encode("ascii") + b"\n", mode=0o600)


def _check_certificate(
    report: CredentialsReport,
    ca_cert: x509.Certificate,
    cert_path: Path,
    now: datetime,
    warn_days: int,
) -> x509.Certificate | None:
    try:
        cert = _read_cert(cert_path)
    except CredentialsError as err:
        report.problems.append(CredentialProblem(cert_path, "invalid", str(err)))
        return None
    expires = cert.not_valid_after_utc
    days_left = (expires - now).total_seconds() / 86400
    report.certificates.append(
        CertificateStatus(cert_path, cert.subject.rfc4514_string(), expires, days_left)
    )
    if days_left <= 0:
        report.problems.append(
            CredentialProblem(cert_path, "expired", f"expired on {expires:%Y-%m-%d}")
        )
    elif days_left < warn_days:
        report.problems.append(
            CredentialProblem(
                cert_path, "expiring", f"expires in {days_left:.0f} days ({expires:%Y-%m-%d})"
            )
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        report.problems.append(
            CredentialProblem(cert_path, "invalid", "not signed by this directory's CA")
        )
    return cert


def _check_private_key(report: CredentialsReport, key_path: Path, cert: x509.Certificate) -> None:
    if not key_path.is_file():
        return
    _check_private_mode(report, key_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        report.problems.append(CredentialProblem(key_path, "invalid", "unreadable private key"))
        return
    if key.public_key() != cert.public_key():
        report.problems.append(
            CredentialProblem(key_path, "invalid", "does not match its certificate")
        )


def _check_supernode_key(report: CredentialsReport, private_path: Path, public_path: Path) -> None:
    if not private_path.is_file():
        return
    _check_private_mode(report, private_path)
    try:
        key = load_ssh_supernode_key(private_path)
    except CredentialsError as err:
        report.problems.append(CredentialProblem(private_path, "invalid", str(err)))
        return
    if public_path.is_file():
        try:
            public = serialization.load_ssh_public_key(public_path.read_bytes())
        except (ValueError, UnsupportedAlgorithm):
            public = None
        if public != key.public_key():
            report.problems.append(
                CredentialProblem(public_path, "invalid", "does not match the private key")
            )


def _check_private_mode(report: CredentialsReport, path: Path) -> None:
    if not path.is_file():
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        report.problems.append(
            CredentialProblem(path, "permissions", f"private key mode {mode:o}; expected 600")
        )


def _load_ca(creds: Credentials) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not creds.ca_key.is_file():
        raise CredentialsError(
            f"the CA private key {creds.ca_key} is not here; run add-hospital where it is kept"
        )
    key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{creds.ca_key} is not an EC private key")
    return _read_cert(creds.ca_cert), key


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CredentialsError(f"no certificate at {path}") from None
    except ValueError:
        raise CredentialsError(f"{path} is not a PEM certificate") from None


def _subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if not hosts:
        raise CredentialsError("a server certificate needs at least one host name or IP address")
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not _DNS_NAME.match(host) or len(host) > 253:
            raise CredentialsError(f"host {host!r} is neither an IP address nor a DNS name")
        names.append(x509.DNSName(host.lower()))
    return names


def _validate_hospitals(hospitals: Sequence[str]) -> list[str]:
    names = list(hospitals)
    for name in names:
        if not _HOSPITAL_NAME.match(name):
            raise CredentialsError(
                f"hospital name {name!r}: use letters, digits, '.', '_' or '-' (at most 63)"
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CredentialsError(f"hospital given twice: {', '.join(duplicates)}")
    return names


def _validate_days(days: int, ca_days: int) -> None:
    if days < 1 or ca_days < 1:
        raise CredentialsError("validity must be at least one day")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_private(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_atomic(path, _pem_private(key), mode=0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _make_private_dirs(creds: Credentials) -> None:
    """Create the root and every directory of the layout with mode 0700 (umask notwithstanding).

    Other local users must not even list which hospitals or keys exist.
    """
    directories = {creds.root}
    for _, path in creds.files():
        parent = path.parent
        while parent != creds.root and creds.root in parent.parents:
            directories.add(parent)
            parent = parent.parent
    for directory in sorted(directories, key=lambda d: len(d.parts)):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
