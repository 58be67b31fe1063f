"""The ``fedllm`` command line: one entry point for researchers, hospital IT and operators."""

from __future__ import annotations

import typer

from fedllm.cli.audit import audit_app
from fedllm.cli.certs import certs_app
from fedllm.cli.hospital import hospital_app
from fedllm.cli.keys import keys_app
from fedllm.cli.plan import add_plan_command
from fedllm.cli.privacy import privacy_app
from fedllm.cli.router import router_command
from fedllm.cli.run import resume_command, run_command
from fedllm.cli.select import add_select_command
from fedllm.cli.serve import serve_command
from fedllm.cli.superlink import superlink_app
from fedllm.cli.users import users_app
from fedllm.telemetry.logging import configure_logging

app = typer.Typer(
    name="fedllm",
    help="Privacy-preserving federated fine-tuning and serving of LMs across hospitals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("run")(run_command)
app.command("resume")(resume_command)
add_select_command(app)
add_plan_command(privacy_app)
app.add_typer(privacy_app, name="privacy")
app.command("serve")(serve_command)
app.command("router")(router_command)
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")
app.add_typer(certs_app, name="certs")
app.add_typer(keys_app, name="keys")
app.add_typer(hospital_app, name="hospital")
app.add_typer(superlink_app, name="superlink")


@app.callback()
def _setup() -> None:
    configure_logging(level="WARNING")


def main() -> None:
    """Console-script entry point."""
    app()
