"""``fedllm audit``: check that an audit log's hash chain is intact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import console, fail, print_json
from fedllm.security.audit import verify_audit_log

audit_app = typer.Typer(name="audit", help="Inspect the serving audit log.", no_args_is_help=True)


@audit_app.command("verify")
def verify_command(
    file: Annotated[Path, typer.Argument(help="Audit log (JSON lines)")],
    expected_head: Annotated[
        str | None,
        typer.Option(help="A head hash recorded earlier; detects entries cut from the end"),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Verify every entry's hash and chain link; exit 1 at the first tampered line."""
    try:
        result = verify_audit_log(file, expected_head=expected_head)
    except OSError as error:
        fail(f"cannot read {file}: {error.strerror}")
    if json_output:
        print_json(
            {
                "ok": result.ok,
                "entries": result.entries,
                "head": result.head,
                "error": result.error,
                "line": result.line,
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
    if not result.ok:
        raise typer.Exit(1)
