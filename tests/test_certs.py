"""The consortium credentials: real TLS handshakes on loopback, Flower's own key loaders."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.cli.supernode.register import try_load_public_key
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication
from typer.testing import CliRunner

from fedllm.cli.certs import certs_app
from fedllm.security.certs import (
    Credentials,
    CredentialsError,
    add_hospital,
    certificate_expiry,
    check_credentials,
    init_credentials,
    load_credentials,
    renew_certificates,
)

HOSPITALS = ["h1", "h2"]


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    out = tmp_path_factory.mktemp("consortium") / "credentials"
    previous = os.umask(0)  # prove the modes are set explicitly, not inherited from the umask
    try:
        return init_credentials(
            out,
            hospitals=HOSPITALS,
            superlink_hosts=["localhost", "127.0.0.1", "superlink.example.org"],
            node_hosts={"h1": ["h1.example.org", "127.0.0.1"]},
        )
    finally:
        os.umask(previous)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return init_credentials(tmp_path_factory.mktemp("other") / "credentials", hospitals=["x"])


def handshake(
    server_cert: Path,
    server_key: Path,
    *,
    trust: Path,
    server_hostname: str,
    client_ca: Path | None = None,
    client_cert: tuple[Path, Path] | None = None,
) -> bytes:
    """Echo five bytes over TLS on 127.0.0.1; raises the client's ssl error on failure."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(server_cert, server_key)
    if client_ca is not None:
        server_ctx.load_verify_locations(client_ca)
        server_ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(5))
        except (ssl.SSLError, OSError):
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=trust)
    if client_cert is not None:
        client_ctx.load_cert_chain(*client_cert)
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"hello")
            return tls.recv(5)
    finally:
        listener.close()
        thread.join(timeout=10)


def test_superlink_handshake_with_consortium_ca(creds: Credentials) -> None:
    for host in ("localhost", "127.0.0.1", "superlink.example.org"):
        assert (
            handshake(
                creds.superlink_cert, creds.superlink_key, trust=creds.ca_cert, server_hostname=host
            )
            == b"hello"
        )


def test_certificate_from_another_ca_is_rejected(creds: Credentials, other_ca: Credentials) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(
            other_ca.superlink_cert,
            other_ca.superlink_key,
            trust=creds.ca_cert,
            server_hostname="localhost",
        )


def test_host_outside_the_sans_is_rejected(creds: Credentials) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(
            creds.superlink_cert,
            creds.superlink_key,
            trust=creds.ca_cert,
            server_hostname="evil.example.org",
        )


def test_sans_are_exactly_the_given_hosts(creds: Credentials) -> None:
    def sans(path: Path) -> set[str]:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(n.value) for n in ext}

    assert sans(creds.superlink_cert) == {"localhost", "127.0.0.1", "superlink.example.org"}
    assert sans(creds.node_server_certs["h1"][0]) == {"h1.example.org", "127.0.0.1"}
    assert sans(creds.node_server_certs["h2"][0]) == {"localhost", "127.0.0.1"}


def test_router_client_certificate_passes_node_mtls(creds: Credentials) -> None:
    cert, key = creds.node_server_certs["h1"]
    echoed = handshake(
        cert,
        key,
        trust=creds.ca_cert,
        server_hostname="h1.example.org",
        client_ca=creds.ca_cert,
        client_cert=(creds.router_client_cert, creds.router_client_key),
    )
    assert echoed == b"hello"


def test_hospital_server_certificate_cannot_pose_as_the_router(creds: Credentials) -> None:
    cert, key = creds.node_server_certs["h1"]
    # Server certificates carry only the serverAuth usage, so the node refuses this one; with
    # TLS 1.3 the client may learn it only when reading, as an error or as a closed connection.
    try:
        echoed = handshake(
            cert,
            key,
            trust=creds.ca_cert,
            server_hostname="127.0.0.1",
            client_ca=creds.ca_cert,
            client_cert=creds.node_server_certs["h2"],
        )
    except (ssl.SSLError, ConnectionError):
        echoed = None
    assert echoed != b"hello"


def test_ca_is_a_path_length_zero_signing_ca(creds: Credentials) -> None:
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def test_private_keys_0600_and_directories_0700(creds: Credentials) -> None:
    private = [
        creds.ca_key,
        creds.superlink_key,
        creds.router_key,
        creds.router_client_key,
        creds.jwt_private_key,
        *(pair[0] for pair in creds.supernode_keys.values()),
        *(pair[1] for pair in creds.node_server_certs.values()),
    ]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in [creds.root, *(p for p in creds.root.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert check_credentials(creds.root).ok


def test_supernode_keys_load_with_flowers_own_loaders(creds: Credentials) -> None:
    for private_path, public_path in creds.supernode_keys.values():
        args = argparse.Namespace(
            auth_supernode_private_key=str(private_path), auth_supernode_public_key=None
        )
        loaded = _try_setup_client_authentication(args)
        assert loaded is not None
        private_key, public_key = loaded
        assert isinstance(private_key.curve, ec.SECP384R1)
        # `flwr supernode register` reads the .pub file; it must be the same key.
        registered = try_load_public_key(public_path)
        assert registered == public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    first, second = (pair[1].read_bytes() for pair in creds.supernode_keys.values())
    assert first != second


def test_jwt_key_pair_is_ed25519_and_matches(creds: Credentials) -> None:
    private = serialization.load_pem_private_key(creds.jwt_private_key.read_bytes(), None)
    public = serialization.load_pem_public_key(creds.jwt_public_key.read_bytes())
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(private.sign(b"token"), b"token")


def test_refuses_to_overwrite_an_existing_ca(tmp_path: Path) -> None:
    out = tmp_path / "credentials"
    init_credentials(out, hospitals=["h1"])
    ca_before = (out / "ca" / "ca.key").read_bytes()
    with pytest.raises(CredentialsError, match="already exists"):
        init_credentials(out, hospitals=["h1"])
    assert (out / "ca" / "ca.key").read_bytes() == ca_before
    init_credentials(out, hospitals=["h1"], force=True)
    assert (out / "ca" / "ca.key").read_bytes() != ca_before


def test_add_hospital_is_signed_by_the_existing_ca(tmp_path: Path) -> None:
    out = tmp_path / "credentials"
    first = init_credentials(out, hospitals=["h1"])
    creds = add_hospital(out, "h3", node_hosts=["127.0.0.1"])
    assert sorted(creds.supernode_keys) == ["h1", "h3"]
    cert, key = creds.node_server_certs["h3"]
    assert handshake(cert, key, trust=first.ca_cert, server_hostname="127.0.0.1") == b"hello"
    with pytest.raises(CredentialsError, match="already has credentials"):
        add_hospital(out, "h3")
    assert load_credentials(out).supernode_keys.keys() == {"h1", "h3"}
    assert check_credentials(out).ok


def test_expiry_and_expiring_soon(tmp_path: Path) -> None:
    out = tmp_path / "credentials"
    creds = init_credentials(out, hospitals=["h1"], days=10)
    expiry = certificate_expiry(creds.superlink_cert)
    assert abs(expiry - (datetime.now(UTC) + timedelta(days=10))) < timedelta(minutes=1)
    assert certificate_expiry(creds.ca_cert) > datetime.now(UTC) + timedelta(days=3000)
    report = check_credentials(out)
    expiring = {p.path for p in report.problems if p.kind == "expiring"}
    assert creds.superlink_cert in expiring
    assert creds.ca_cert not in expiring
    assert not report.ok


def test_renewal_extends_certificates_and_keeps_keys_and_names(tmp_path: Path) -> None:
    out = tmp_path / "credentials"
    creds = init_credentials(out, hospitals=["h1"], superlink_hosts=["sl.example.org"], days=10)
    key_before = creds.superlink_key.read_bytes()
    auth_before = creds.supernode_keys["h1"][0].read_bytes()
    assert not check_credentials(out).ok
    renewed = renew_certificates(out, days=365)
    assert creds.superlink_cert in renewed
    assert creds.router_client_cert in renewed
    assert check_credentials(out).ok
    assert certificate_expiry(creds.superlink_cert) > datetime.now(UTC) + timedelta(days=360)
    assert creds.superlink_key.read_bytes() == key_before
    assert creds.supernode_keys["h1"][0].read_bytes() == auth_before
    echoed = handshake(
        creds.superlink_cert,
        creds.superlink_key,
        trust=creds.ca_cert,
        server_hostname="sl.example.org",
    )
    assert echoed == b"hello"


def test_check_reports_loose_permissions_and_mismatched_keys(tmp_path: Path) -> None:
    out = tmp_path / "credentials"
    creds = init_credentials(out, hospitals=["h1", "h2"])
    creds.jwt_private_key.chmod(0o644)
    creds.node_server_certs["h1"][1].write_bytes(creds.node_server_certs["h2"][1].read_bytes())
    problems = {(p.path, p.kind) for p in check_credentials(out).problems}
    assert (creds.jwt_private_key, "permissions") in problems
    assert (creds.node_server_certs["h1"][1], "invalid") in problems


def test_check_on_a_partys_own_copy(tmp_path: Path) -> None:
    """A hospital holds only ca.crt and its own directories; the CA key is offline."""
    creds = init_credentials(tmp_path / "operator", hospitals=["h1", "h2"])
    site = tmp_path / "site"
    for relative in ("ca/ca.crt", "nodes/h1", "supernodes/h1"):
        source = creds.root / relative
        target = site / relative
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    for directory in [site, *(p for p in site.rglob("*") if p.is_dir())]:
        directory.chmod(0o700)
    report = check_credentials(site)
    assert report.ok, report.problems
    assert {c.path.relative_to(site).as_posix() for c in report.certificates} == {
        "ca/ca.crt",
        "nodes/h1/server.crt",
    }
    (site / "supernodes" / "h1" / "auth_key.pub").write_bytes(
        creds.supernode_keys["h2"][1].read_bytes()
    )
    (site / "nodes" / "h1" / "server.crt").unlink()
    problems = {
        (p.path.relative_to(site).as_posix(), p.kind) for p in check_credentials(site).problems
    }
    assert problems == {
        ("supernodes/h1/auth_key.pub", "invalid"),
        ("nodes/h1/server.crt", "missing"),
    }


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="neither an IP address nor a DNS name"):
        init_credentials(tmp_path / "a", hospitals=["h1"], superlink_hosts=["bad host!"])
    with pytest.raises(CredentialsError, match="hospital name"):
        init_credentials(tmp_path / "b", hospitals=["../escape"])
    with pytest.raises(CredentialsError, match="twice"):
        init_credentials(tmp_path / "c", hospitals=["h1", "h1"])
    with pytest.raises(CredentialsError, match="no credentials"):
        check_credentials(tmp_path / "missing")


def test_cli_init_and_check(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "credentials"
    result = runner.invoke(
        certs_app,
        ["init", "--out", str(out), "--hospital", "h1", "--node-host", "h1=10.0.0.7"],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(certs_app, ["check", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True
    result = runner.invoke(certs_app, ["init", "--out", str(out), "--hospital", "h1"])
    assert result.exit_code == 2
    assert "already exists" in result.output
    (out / "router" / "client.key").chmod(0o640)
    result = runner.invoke(certs_app, ["check", "--out", str(out), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["problems"][0]["kind"] == "permissions"


def test_one_bundle_holds_what_a_hospital_needs_named_as_its_template_expects(tmp_path):
    import yaml

    out = tmp_path / "credentials"
    runner = CliRunner()
    made = runner.invoke(
        certs_app, ["init", "--out", str(out), "--hospital", "st-mary", "--hospital", "north"]
    )
    assert made.exit_code == 0, made.output
    target = tmp_path / "st-mary-bundle"
    bundled = runner.invoke(
        certs_app, ["bundle", "--out", str(out), "--hospital", "st-mary", "--to", str(target)]
    )
    assert bundled.exit_code == 0, bundled.output
    assert sorted(p.name for p in target.iterdir()) == [
        "auth_key",
        "auth_key.pub",
        "ca.crt",
        "node.crt",
        "node.key",
    ]
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "auth_key").stat().st_mode) == 0o600
    assert stat.S_IMODE((target / "node.key").stat().st_mode) == 0o600
    assert (target / "auth_key").read_bytes() == (out / "supernodes/st-mary/auth_key").read_bytes()
    assert (target / "node.crt").read_bytes() == (out / "nodes/st-mary/server.crt").read_bytes()
    # every credentials/ file the hospital template names is in the bundle
    template = yaml.safe_load((Path(__file__).parents[1] / "configs/hospital.yaml").read_text())
    named = {value for value in _strings(template) if value.startswith("credentials/")}
    assert {Path(value).name for value in named} <= {p.name for p in target.iterdir()}
    # no silent overwrite
    again = runner.invoke(
        certs_app, ["bundle", "--out", str(out), "--hospital", "st-mary", "--to", str(target)]
    )
    assert again.exit_code == 2
    assert "already exists" in again.output
    unknown = runner.invoke(
        certs_app, ["bundle", "--out", str(out), "--hospital", "west", "--to", str(tmp_path / "w")]
    )
    assert unknown.exit_code == 2
    assert "no credentials for hospital 'west'" in unknown.output


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value
