"""The ``fedllm`` command line: one entry point for researchers, hospital IT and operators.

Commands are imported only when they run (see ``fedllm.cli.lazy``): ``fedllm --help`` and
``fedllm privacy epsilon`` never pay for torch, transformers, peft, opacus, fastapi or
matplotlib.
"""

from __future__ import annotations

from typing import ClassVar

import typer

from fedllm.cli.lazy import LazyCommand, LazyGroup


class FedllmGroup(LazyGroup):
    """The top-level commands, in the order ``fedllm --help`` lists them."""

    lazy_commands: ClassVar[dict[str, LazyCommand]] = {
        "run": LazyCommand(
            "fedllm.cli.run:run_command",
            "Run a federation of simulated hospitals (or a deployed one); outputs go to"
            " <output_dir>/<name>/.",
        ),
        "resume": LazyCommand(
            "fedllm.cli.run:resume_command",
            "Continue a run that stopped part-way, from the last round its server ledger recorded.",
        ),
        "deliver": LazyCommand(
            "fedllm.cli.deliver:deliver_command",
            "Deliver a finished run's published DP adapter to every connected hospital again.",
        ),
        "select": LazyCommand(
            "fedllm.cli.select:select_command",
            "Pick K eligible hospitals maximising utility minus λ·redundancy, with inclusion odds.",
        ),
        "serve": LazyCommand(
            "fedllm.cli.serve:serve_command",
            "Serve the hospital's model (OpenAI-compatible API, /v1/inference, consensus votes).",
        ),
        "router": LazyCommand(
            "fedllm.cli.router:router_command", "Serve the router until interrupted (Ctrl-C)."
        ),
        "privacy": LazyCommand(
            "fedllm.cli.privacy:privacy_app",
            "Unit-level privacy accounting for DP-SGD (ε from σ, or σ from a target ε).",
        ),
        "users": LazyCommand(
            "fedllm.cli.users:users_app",
            "Manage serving users: roles, departments, passwords and lockouts.",
        ),
        "audit": LazyCommand("fedllm.cli.audit:audit_app", "Inspect the serving audit log."),
        "certs": LazyCommand(
            "fedllm.cli.certs:certs_app",
            "Consortium CA, TLS certificates, SuperNode authentication and router signing keys.",
        ),
        "keys": LazyCommand(
            "fedllm.cli.keys:keys_app",
            "AES-256-GCM keys for encrypting adapters, checkpoints and ledgers at rest.",
        ),
        "hospital": LazyCommand(
            "fedllm.cli.hospital:hospital_app",
            "Run this hospital's part of the federation (Flower SuperNode, inference server).",
        ),
        "model": LazyCommand(
            "fedllm.cli.model:model_app",
            "Build the embedded base model into a directory to distribute, and verify its hash.",
        ),
        "superlink": LazyCommand(
            "fedllm.cli.superlink:superlink_app",
            "Run the federation's Flower SuperLink and register hospitals (operator).",
        ),
    }


app = typer.Typer(
    name="fedllm",
    help="Privacy-preserving federated fine-tuning and serving of LMs across hospitals.",
    cls=FedllmGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _setup() -> None:
    from fedllm.telemetry.logging import configure_logging

    configure_logging(level="WARNING")


def main() -> None:
    """Console-script entry point."""
    app()
