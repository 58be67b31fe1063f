"""`fedllm certs`: create and check the consortium's CA, TLS certificates and SuperNode keys."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedllm.cli.common import console, fail, print_json
from fedllm.security.certs import (
    DEFAULT_CA_DAYS,
    DEFAULT_DAYS,
    DEFAULT_HOSTS,
    EXPIRY_WARNING_DAYS,
    Credentials,
    CredentialsError,
    add_hospital,
    certificate_expiry,
    check_credentials,
    hospital_bundle,
    init_credentials,
    renew_certificates,
)

certs_app = typer.Typer(
    name="certs",
    help="Consortium CA, TLS certificates, SuperNode authentication and router signing keys.",
    no_args_is_help=True,
)

Out = Annotated[Path, typer.Option("--out", help="Credentials directory.")]
Days = Annotated[int, typer.Option("--days", help="Validity of leaf certificates in days.")]
Force = Annotated[bool, typer.Option("--force", help="Replace what already exists.")]


@certs_app.command("init")
def init_command(
    hospital: Annotated[list[str], typer.Option("--hospital", help="A hospital name (repeat).")],
    out: Out = Path("credentials"),
    superlink_host: Annotated[
        list[str] | None,
        typer.Option("--superlink-host", help="SuperLink DNS name or IP (repeat)."),
    ] = None,
    router_host: Annotated[
        list[str] | None, typer.Option("--router-host", help="Router DNS name or IP (repeat).")
    ] = None,
    node_host: Annotated[
        list[str] | None,
        typer.Option(
            "--node-host",
            help="HOSPITAL=HOST for a hospital's inference server (repeat; default localhost).",
        ),
    ] = None,
    days: Days = DEFAULT_DAYS,
    ca_days: Annotated[int, typer.Option("--ca-days", help="Validity of the CA.")] = (
        DEFAULT_CA_DAYS
    ),
    force: Force = False,
) -> None:
    """Create a new consortium CA and every credential of a deployment."""
    try:
        creds = init_credentials(
            out,
            hospitals=hospital,
            superlink_hosts=superlink_host or DEFAULT_HOSTS,
            router_hosts=router_host or DEFAULT_HOSTS,
            node_hosts=_node_hosts(node_host or []),
            days=days,
            ca_days=ca_days,
            force=force,
        )
    except CredentialsError as err:
        fail(str(err))
    _print_written(creds)


@certs_app.command("add-hospital")
def add_hospital_command(
    hospital: Annotated[str, typer.Option("--hospital", help="The joining hospital's name.")],
    out: Out = Path("credentials"),
    node_host: Annotated[
        list[str] | None,
        typer.Option("--node-host", help="Its inference server's DNS name or IP (repeat)."),
    ] = None,
    days: Days = DEFAULT_DAYS,
    force: Force = False,
) -> None:
    """Issue credentials for a hospital joining an existing consortium (needs the CA key)."""
    try:
        creds = add_hospital(
            out, hospital, node_hosts=node_host or DEFAULT_HOSTS, days=days, force=force
        )
    except CredentialsError as err:
        fail(str(err))
    _print_written(creds, only=hospital)


@certs_app.command("bundle")
def bundle_command(
    hospital: Annotated[str, typer.Option("--hospital", help="The hospital to bundle for.")],
    to: Annotated[Path, typer.Option("--to", help="Directory to write the bundle into.")],
    out: Out = Path("credentials"),
    force: Force = False,
) -> None:
    """Write what one hospital needs (CA certificate, SuperNode key pair, inference server TLS)
    into one directory, named as configs/hospital.yaml expects."""
    try:
        written = hospital_bundle(out, hospital, to, force=force)
    except CredentialsError as err:
        fail(str(err))
    for path in written:
        console.print(f"  {path}", highlight=False)
    console.print(
        f"Send {to} to {hospital}'s IT over a trusted channel: it holds their private keys.",
        highlight=False,
    )


@certs_app.command("renew")
def renew_command(out: Out = Path("credentials"), days: Days = DEFAULT_DAYS) -> None:
    """Re-sign every leaf certificate for --days more, keeping keys, host names and usages."""
    try:
        renewed = renew_certificates(out, days=days)
    except CredentialsError as err:
        fail(str(err))
    table = Table("certificate", "expires")
    for path in renewed:
        table.add_row(str(path), f"{certificate_expiry(path):%Y-%m-%d}")
    console.print(table)
    console.print("Copy each renewed certificate to its party and restart it.")


@certs_app.command("check")
def check_command(
    out: Out = Path("credentials"),
    warn_days: Annotated[
        int, typer.Option("--warn-days", help="Report certificates expiring sooner.")
    ] = EXPIRY_WARNING_DAYS,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Report expiring certificates and loose permissions; exit 1 if there is any."""
    try:
        report = check_credentials(out, warn_days=warn_days)
    except CredentialsError as err:
        fail(str(err))
    if as_json:
        print_json(
            {
                "ok": report.ok,
                "certificates": [
                    {
                        "path": str(c.path),
                        "subject": c.subject,
                        "expires_at": c.expires_at.isoformat(),
                        "days_left": round(c.days_left, 1),
                    }
                    for c in report.certificates
                ],
                "problems": [
                    {"path": str(p.path), "kind": p.kind, "message": p.message}
                    for p in report.problems
                ],
            }
        )
    else:
        table = Table("certificate", "subject", "expires", "days left")
        for cert in report.certificates:
            table.add_row(
                str(cert.path),
                cert.subject,
                f"{cert.expires_at:%Y-%m-%d}",
                f"{cert.days_left:.0f}",
            )
        console.print(table)
        for problem in report.problems:
            console.print(f"[bold red]{problem.kind}[/] {problem.path}: {problem.message}")
        if report.ok:
            console.print("[green]all credentials valid[/]")
    if not report.ok:
        raise typer.Exit(1)


def _node_hosts(values: list[str]) -> dict[str, list[str]]:
    hosts: dict[str, list[str]] = {}
    for value in values:
        name, sep, host = value.partition("=")
        if not sep or not name or not host:
            fail(f"--node-host {value!r}: expected HOSPITAL=HOST")
        hosts.setdefault(name, []).append(host)
    return hosts


def _print_written(creds: Credentials, *, only: str | None = None) -> None:
    table = Table("file", "what", "mode", "expires")
    for description, path in creds.files():
        if only is not None and f"/{only}/" not in f"/{path.relative_to(creds.root)}":
            continue
        if not path.exists():
            continue
        expires = f"{certificate_expiry(path):%Y-%m-%d}" if path.suffix == ".crt" else ""
        mode = f"{stat.S_IMODE(path.stat().st_mode):o}"
        table.add_row(str(path), description, mode, expires)
    console.print(table)
    console.print(
        f"Keep [bold]{creds.ca_key}[/] offline; give each party only its own directory "
        "plus ca/ca.crt (see docs/credentials.md)."
    )
