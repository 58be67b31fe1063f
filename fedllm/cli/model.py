"""``fedllm model``: build the embedded base model once, as a directory to ship, and verify one.

Weights pretrained on different hardware or thread counts need not be identical, and a
federation refuses a hospital whose base model hashes differently from the server's. So the
operator builds the tiny model once (``fedllm model build``), ships the directory to every
hospital and inference server, and each sets ``model.name`` to its path; loading it verifies
the files against the hash recorded beside them (``base-model.json``), and ``fedllm model
verify`` shows that hash for comparison with the one the operator announced.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import console, fail, print_json
from fedllm.config.loading import ConfigError, load_config
from fedllm.config.schema import ModelConfig
from fedllm.models.identity import (
    BASE_MODEL_FILE,
    BaseModelIdentity,
    BaseModelIdentityError,
    identify,
    model_files,
    read_identity_file,
)

model_app = typer.Typer(
    name="model",
    help="Build the embedded base model into a directory to distribute, and verify its hash.",
    no_args_is_help=True,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the identity as JSON.")]


@model_app.command("build")
def build_command(
    out: Annotated[Path, typer.Option("--out", help="New directory to write the model into.")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Experiment YAML whose model.tiny section to build (default: the defaults).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Build (or take from the cache) the tiny base model, copy it into OUT, print its hash."""
    from fedllm.models.tiny import ensure_tiny_model  # torch only when building

    tiny = ModelConfig().tiny
    if config is not None:
        try:
            experiment = load_config(config)
        except ConfigError as error:
            fail(str(error))
        if experiment.model.name != "tiny":
            fail(f"{config}: model.name is {experiment.model.name!r}; only 'tiny' is built here")
        tiny = experiment.model.tiny
    with console.status("Building the base model (pretraining on public text)..."):
        source = ensure_tiny_model(tiny)
    built, _, _ = read_identity_file(source / BASE_MODEL_FILE)
    if not out.exists():
        _copy_model(source, out)
    elif _recorded_hash(out) != built:
        fail(f"{out} already exists and holds another model: choose a new directory")
    try:
        identity = identify(out, str(out), None, out / BASE_MODEL_FILE)
    except BaseModelIdentityError as error:
        fail(str(error))
    _show(identity, as_json, f"built {out}: set model.name: {out} and ship the directory")


@model_app.command("verify")
def verify_command(
    directory: Annotated[Path, typer.Argument(help="A model directory with base-model.json.")],
    as_json: JsonOption = False,
) -> None:
    """Re-hash a model directory against its base-model.json; print the hash, or what changed."""
    if not (directory / BASE_MODEL_FILE).is_file():
        fail(f"{directory}: no {BASE_MODEL_FILE} (build it with fedllm model build)")
    try:
        identity = identify(directory, str(directory), None, directory / BASE_MODEL_FILE)
    except BaseModelIdentityError as error:
        fail(str(error))
    _show(identity, as_json, f"{directory}: every file matches its recorded hash")


def _recorded_hash(directory: Path) -> str | None:
    """The hash recorded in ``directory``, None when it has no readable record."""
    try:
        return read_identity_file(directory / BASE_MODEL_FILE)[0]
    except BaseModelIdentityError:
        return None


def _copy_model(source: Path, out: Path) -> None:
    """Copy the model files and their record into ``out`` through a staging directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for path in [*model_files(source), source / BASE_MODEL_FILE]:
            shutil.copy2(path, staging / path.name)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _show(identity: BaseModelIdentity, as_json: bool, line: str) -> None:
    if as_json:
        print_json({"path": identity.path, "sha256": identity.sha256, "files": identity.files})
        return
    console.print(line, highlight=False)
    console.print(f"base model sha256: {identity.sha256}", highlight=False)
