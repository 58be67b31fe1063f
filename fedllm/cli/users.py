"""``fedllm users``: manage who may use the serving API (add, list, remove, unlock)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from fedllm.cli.common import console, fail, print_json
from fedllm.security.users import Role, UserStore

users_app = typer.Typer(
    name="users",
    help="Manage serving users: roles, departments, passwords and lockouts.",
    no_args_is_help=True,
)

DEFAULT_USERS_DB = "sqlite:///router.db"  # the router's own default database.url

Database = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="FEDLLM_USERS_DB",
        help="SQLAlchemy URL of the user database (env FEDLLM_USERS_DB)",
    ),
]
Username = Annotated[str, typer.Argument(help="Login name: 1-64 of letters, digits, _ . @ -")]


@contextmanager
def _open_store(url: str) -> Iterator[UserStore]:
    """The user store at `url`; database failures become one-line errors."""
    try:
        store = UserStore(url)
    except (SQLAlchemyError, ValueError) as error:
        fail(f"cannot open user database {url}: {_short(error)}")
    try:
        yield store
    except SQLAlchemyError as error:
        fail(f"user database {url}: {_short(error)}")
    finally:
        store.close()


def _short(error: Exception) -> str:
    """The first line of a database error, without SQLAlchemy's SQL dump and links."""
    original = getattr(error, "orig", None) or error
    return str(original).splitlines()[0] if str(original) else type(original).__name__


@users_app.command("add")
def add_command(
    username: Username,
    role: Annotated[Role, typer.Option(help="What the user may do")],
    department: Annotated[str, typer.Option(help="Department, e.g. cardiology")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input")
    ] = False,
    db: Database = DEFAULT_USERS_DB,
) -> None:
    """Add a user; the password is asked twice (hidden) unless --password-stdin is given."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _open_store(db) as store:
        try:
            user = store.add_user(username, password, role, department)
        except ValueError as error:
            fail(str(error))
    console.print(
        f"[green]added[/] {user.username} ({user.role.value}, {user.department})",
        highlight=False,
    )


@users_app.command("list")
def list_command(
    db: Database = DEFAULT_USERS_DB,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List users with their role, department and lockout state."""
    with _open_store(db) as store:
        accounts = store.accounts()
    if json_output:
        print_json(
            [
                {
                    "username": a.user.username,
                    "role": a.user.role.value,
                    "department": a.user.department,
                    "failed_logins": a.failed_logins,
                    "locked_until": _iso(a.locked_until),
                }
                for a in accounts
            ]
        )
        return
    table = Table("username", "role", "department", "failed logins", "locked until")
    for a in accounts:
        table.add_row(
            a.user.username,
            a.user.role.value,
            a.user.department,
            str(a.failed_logins),
            _iso(a.locked_until) or "-",
        )
    console.print(table)


@users_app.command("remove")
def remove_command(username: Username, db: Database = DEFAULT_USERS_DB) -> None:
    """Delete a user (tokens already issued stay valid until they expire)."""
    with _open_store(db) as store:
        try:
            store.remove_user(username)
        except ValueError as error:
            fail(str(error))
    console.print(f"[green]removed[/] {username}", highlight=False)


@users_app.command("unlock")
def unlock_command(username: Username, db: Database = DEFAULT_USERS_DB) -> None:
    """Lift a lockout and reset the failed-login count."""
    with _open_store(db) as store:
        try:
            store.unlock(username)
        except ValueError as error:
            fail(str(error))
    console.print(f"[green]unlocked[/] {username}", highlight=False)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
