"""``fedllm serve --config node.yaml``: run a hospital's inference server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import console, fail
from fedllm.config.loading import ConfigError
from fedllm.models.loading import ModelLoadError
from fedllm.security.encryption import EncryptionError
from fedllm.security.environment import keyring_from_environment
from fedllm.serving.node.config import NodeServerConfig, load_node_config
from fedllm.serving.node.generation import AdapterLoadError
from fedllm.serving.node.server import build_node_app, serve_node
from fedllm.telemetry.logging import configure_logging


def serve_command(
    config: Annotated[
        Path, typer.Option("--config", help="Node server YAML, e.g. configs/node.yaml")
    ],
) -> None:
    """Serve the hospital's model (OpenAI-compatible API, /v1/inference, consensus votes)."""
    try:
        node = load_node_config(config)
    except ConfigError as error:
        fail(str(error))
    # A server's own log lines (adapter reloads, refused consensus) are for its operator.
    configure_logging()
    try:
        app = build_node_app(node, keyring=keyring_from_environment())
    except (ModelLoadError, AdapterLoadError, EncryptionError, ValueError) as error:
        fail(f"{config}: cannot start node {node.node_id!r}: {error}")
    _announce(node)
    try:
        serve_node(node, app)
    except KeyboardInterrupt:  # uvicorn has shut down cleanly and re-raised Ctrl-C
        console.print(f"node {node.node_id} stopped")


def _announce(node: NodeServerConfig) -> None:
    """Tell the operator where the node listens and what it serves."""
    scheme = "https" if node.tls is not None else "http"
    mtls = (
        " (mutual TLS: client certificates required)"
        if node.tls and node.tls.client_ca_file
        else ""
    )
    if node.backend == "constant":
        adapter = "none (constant backend)"
    elif node.adapter_dir is None:
        adapter = "none (base model only)"
    else:
        adapter = str(node.adapter_dir) + (
            " (allow_non_dp_adapters: adapters WITHOUT a DP record are served too)"
            if node.allow_non_dp_adapters
            else " (DP-recorded adapters only)"
        )
    consensus = "on" if node.ledger is not None else "off (no privacy ledger configured)"
    console.print(
        f"[bold]fedllm node[/] {node.node_id} (hospital {node.hospital_id}) listening on "
        f"{scheme}://{node.host}:{node.port}{mtls}\n"
        f"  backend: {node.backend}   global adapter: {adapter}   consensus: {consensus}",
        highlight=False,
    )
