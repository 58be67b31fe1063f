"""Console output shared by the CLI commands: rich for people, plain JSON for programs."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn, TextIO

import typer
from rich.console import Console

# Width of output that goes to a file or a pipe: wide enough that no table is cut.
UNBOUNDED_WIDTH = 1000


def _width(stream: TextIO) -> int | None:
    """Rich's width for `stream`: the terminal's or COLUMNS, else wide enough for any table.

    Rich falls back to 80 columns when output is not a terminal, which squeezes tables into
    wrapped, truncated cells exactly when they are saved to a file or parsed by a script.
    """
    if os.environ.get("COLUMNS", "").isdigit() or stream.isatty():
        return None
    return UNBOUNDED_WIDTH


console = Console(width=_width(sys.stdout))
error_console = Console(stderr=True, width=_width(sys.stderr))


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a user-facing error in one block (no traceback) and exit."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(payload: Any) -> None:
    """Machine-readable output on stdout, nothing else."""
    typer.echo(json.dumps(payload, indent=2, allow_nan=False))
