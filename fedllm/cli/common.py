"""Console output shared by the CLI commands: rich for people, plain JSON for programs."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console

console = Console()
error_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a user-facing error in one block (no traceback) and exit."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(payload: Any) -> None:
    """Machine-readable output on stdout, nothing else."""
    typer.echo(json.dumps(payload, indent=2, allow_nan=False))
