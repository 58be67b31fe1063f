"""Command groups that import a command's module only when that command runs.

Most commands need torch, transformers, peft, opacus, fastapi or matplotlib, and importing all
of them costs seconds of CPU before anything happens. Printing ``fedllm --help`` or one ε
needs none of that, so a group lists its commands from a table (name, one-line help) and
imports a command's module only when the command is invoked or its own help is asked for.
"""

from __future__ import annotations

import importlib
from difflib import get_close_matches
from typing import Any, ClassVar

import click
import typer
from typer.core import TyperGroup


class LazyCommand:
    """Where a command lives (``module:attribute``) and the line that lists it in its group.

    The attribute is a command function or a ``typer.Typer`` sub-application. The line is the
    command's short help whether or not it was loaded, so the listing never depends on which
    modules happen to be imported.
    """

    def __init__(self, target: str, short_help: str) -> None:
        self.target = target
        self.short_help = short_help

    def load(self, name: str) -> click.Command:
        """Import the target and build its click command, named `name`."""
        module_name, _, attribute = self.target.partition(":")
        target = getattr(importlib.import_module(module_name), attribute)
        if isinstance(target, typer.Typer):
            command: click.Command = typer.main.get_group(target)
        else:
            holder = typer.Typer(add_completion=False)
            holder.command(name)(target)
            command = typer.main.get_command(holder)
        command.name = name
        command.short_help = self.short_help
        return command


class LazyGroup(TyperGroup):
    """A Typer group whose ``lazy_commands`` (set by a subclass) are imported on first use.

    Commands registered the usual Typer way come first; the lazy ones follow in table order.
    """

    lazy_commands: ClassVar[dict[str, LazyCommand]] = {}

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self._listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Registered commands, then the lazy ones not loaded yet."""
        return list(dict.fromkeys([*super().list_commands(ctx), *self.lazy_commands]))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command, imported now unless it is only being listed in this group's help."""
        command = super().get_command(ctx, cmd_name)
        lazy = self.lazy_commands.get(cmd_name)
        if command is not None or lazy is None:
            return command
        if self._listing:
            return click.Command(cmd_name, short_help=lazy.short_help)
        command = lazy.load(cmd_name)
        self.add_command(command, cmd_name)
        return command

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The group's help lists its commands from the table, importing none of them."""
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """Suggest close command names for a typo, lazy ones included."""
        try:
            return click.Group.resolve_command(self, ctx, args)
        except click.UsageError as error:
            matches = get_close_matches(args[0], self.list_commands(ctx)) if args else []
            if self.suggest_commands and matches:
                suggestions = ", ".join(repr(match) for match in matches)
                error.message = f"{error.message.rstrip('.')}. Did you mean {suggestions}?"
            raise
