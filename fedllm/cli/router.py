"""`fedllm router --config router.yaml`: the authenticated, budgeted front door to the nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import console, error_console, fail
from fedllm.config.loading import ConfigError

ConfigOption = Annotated[
    Path, typer.Option("--config", help="router YAML (see configs/router.yaml)")
]


def router_command(config: ConfigOption) -> None:
    """Serve the router until interrupted (Ctrl-C)."""
    from fedllm.serving.router.app import create_router_app
    from fedllm.serving.router.config import load_router_config
    from fedllm.serving.router.server import INSECURE_WARNING, listen_url, run_router_app
    from fedllm.telemetry.logging import configure_logging

    try:
        settings = load_router_config(config)
        configure_logging()
        app = create_router_app(settings)
    except ConfigError as error:
        fail(" ".join(str(error).split()))
    if settings.tls is None:
        error_console.print(f"[bold yellow]WARNING:[/] {INSECURE_WARNING}", highlight=False)
    console.print(f"fedllm router listening on {listen_url(settings)}", highlight=False)
    try:
        run_router_app(app, settings)
    except KeyboardInterrupt:  # uvicorn has shut down cleanly and re-raised Ctrl-C
        console.print("fedllm router stopped")
