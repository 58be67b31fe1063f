"""``fedllm audit``: check that an audit log's HMAC chain is intact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import console, fail, print_json
from fedllm.security.audit import AuditFormatError, read_audit_key, verify_audit_log

audit_app = typer.Typer(name="audit", help="Inspect the serving audit log.", no_args_is_help=True)


@audit_app.command("verify")
def verify_command(
    file: Annotated[Path, typer.Argument(help="Audit log (JSON lines)")],
    key_file: Annotated[
        Path | None,
        typer.Option(help="The router's audit key (audit.redaction_key_file)"),
    ] = None,
    key_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding the audit key (audit.redaction_key_env)"),
    ] = None,
    expected_head: Annotated[
        str | None,
        typer.Option(help="A head recorded earlier; detects entries cut from the end"),
    ] = None,
    legacy: Annotated[
        bool,
        typer.Option(help="Check an unkeyed log written before keyed chains (no key needed)"),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Verify every entry's MAC and chain link; exit 1 at the first tampered line."""
    key: bytes | None = None
    if not legacy:
        if key_file is None and key_env is None:
            fail("pass --key-file or --key-env: the audit chain is keyed with the audit key")
        try:
            key = read_audit_key(file=key_file, env=key_env)
        except OSError as error:
            fail(f"cannot read key file {key_file}: {error.strerror}")
        except ValueError as error:
            fail(str(error))
    try:
        result = verify_audit_log(file, key, expected_head=expected_head, legacy=legacy)
    except OSError as error:
        fail(f"cannot read {file}: {error.strerror}")
    except AuditFormatError as error:
        fail(str(error))
    if json_output:
        print_json(
            {
                "ok": result.ok,
                "entries": result.entries,
                "head": result.head,
                "error": result.error,
                "line": result.line,
                "keyed": result.keyed,
            }
        )
    elif result.ok:
        console.print(
            f"[green]ok[/] {file}: {result.entries} entries, head {result.head}", highlight=False
        )
    else:
        console.print(
            f"[bold red]tampered[/] {file}: {result.error} "
            f"({result.entries} valid entries before it)",
            highlight=False,
            soft_wrap=True,
        )
    if legacy and not json_output:
        console.print(
            "[yellow]warning[/]: legacy unkeyed chain; anyone who can write the file can "
            "recompute it, so only an --expected-head recorded elsewhere anchors it",
            highlight=False,
        )
    if not result.ok:
        raise typer.Exit(1)
