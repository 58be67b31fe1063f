"""``fedllm run``: a whole experiment from one YAML file on Flower's local simulation runtime,
or, with ``--federation NAME``, on a deployed SuperLink and the hospitals' SuperNodes."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fedllm.cli.common import console, fail, print_json
from fedllm.config import ConfigError, ExperimentConfig, dump_config, load_config
from fedllm.data import DataError
from fedllm.federation.experiment import APP_ROOT, EXPERIMENT, experiment_json
from fedllm.federation.flower_cli import DeployedFederation, deployed_federation
from fedllm.federation.hospital_data import check_simulation_ledgers
from fedllm.federation.launcher import (
    FederationError,
    SimulationResources,
    local_superlink,
    run_app,
)
from fedllm.federation.preflight import preflight
from fedllm.report.progress import STARTED_EVENT, progress_event
from fedllm.report.run_dir import allocate_run_dir
from fedllm.report.run_report import REPORT_FILE, read_report_json
from fedllm.report.run_summary import SUMMARY_FILE, run_summary, with_summary, write_summary
from fedllm.strategies.contract import check_strategy_class

WithBaselines = Annotated[
    bool, typer.Option(help="Also run the baselines listed in evaluation.baselines")
]
JsonReport = Annotated[bool, typer.Option("--json", help="Print the report as JSON")]


def run_command(
    config_file: Annotated[Path, typer.Argument(help="Experiment YAML, e.g. configs/default.yaml")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: --set training.local_steps=5"),
    ] = None,
    baselines: WithBaselines = True,
    json_output: JsonReport = False,
    federation: Annotated[
        str | None,
        typer.Option(
            "--federation",
            help="Run on a deployed SuperLink: a \\[superlink.NAME] entry of your Flower config "
            "(~/.flwr/config.toml) instead of simulated hospitals",
        ),
    ] = None,
) -> None:
    """Run a federation of simulated hospitals (or a deployed one); outputs go to
    <output_dir>/<name>/."""
    try:
        config = load_config(config_file, overrides or [])
        if federation and config.evaluation.release == "exact":
            fail(
                "evaluation.release: got 'exact'; a deployed federation evaluates on hospitals' "
                "own patients, which leaves them only as a DP release: expected 'dp' or 'off'"
            )
        target = deployed_federation(federation) if federation else None
    except (ConfigError, FederationError) as error:
        fail(str(error))
    try:
        # before any process starts or any hospital releases anything (docs/configuration.md)
        config = preflight(config, simulation=target is None)
        if config.strategy.strategy_class:
            check_strategy_class(config.strategy.strategy_class, APP_ROOT)
    except ValueError as error:
        fail(str(error))
    if target is None:
        try:
            check_simulation_ledgers(config)
        except ValueError as error:
            fail(str(error))
        except OSError as error:
            fail(f"privacy.ledger_dir: cannot keep the dataset's ledgers there ({error})")
    if target is not None and baselines and config.evaluation.baselines and not json_output:
        # federated_no_dp would train on the hospitals' records without DP
        console.print("Baselines are not run against a deployed federation.")
    run_and_show(
        config,
        allocate_run_dir(config.run.output_dir, config.run.name),
        baselines and target is None,
        json_output,
        target,
    )


def resume_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/quickstart")],
    baselines: WithBaselines = True,
    json_output: JsonReport = False,
) -> None:
    """Continue a run that stopped part-way, from the last round its server ledger recorded."""
    try:
        config = load_config(run_dir / "config.yaml")
    except ConfigError as error:
        fail(f"{run_dir} is not a resumable run: {error}")
    try:
        # checked here, where the run starts again: the ServerApp takes the experiment as given
        config = preflight(config, simulation=True)
        if config.strategy.strategy_class:
            check_strategy_class(config.strategy.strategy_class, APP_ROOT)
    except ValueError as error:
        fail(str(error))
    run_and_show(config, run_dir.resolve(), baselines, json_output)


def run_and_show(
    config: ExperimentConfig,
    run_dir: Path,
    baselines: bool,
    json_output: bool,
    target: DeployedFederation | None = None,
) -> None:
    """Execute a run, turning user-facing failures into one-line errors."""
    from fedllm.models.loading import ModelLoadError

    try:
        report = execute(
            config, run_dir, with_baselines=baselines, quiet=json_output, target=target
        )
    except (ConfigError, DataError, ModelLoadError, FederationError) as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail(
            f"interrupted; Flower processes stopped. Continue with: fedllm resume {run_dir}",
            code=130,
        )
    if json_output:
        print_json(report)
    else:
        show_summary(report, run_dir)
    if report["status"] == "degraded":
        # the run produced a model, but not the one asked for: a sweep must see it
        fail(f"the run is degraded: {report.get('error')}{_causes(report)}", code=1)


def execute(
    config: ExperimentConfig,
    run_dir: Path,
    *,
    with_baselines: bool,
    quiet: bool,
    target: DeployedFederation | None = None,
) -> dict[str, Any]:
    """Federated run, then baselines; writes summary.json beside the ServerApp's report.json and
    returns both as one object (what ``--json`` prints)."""
    from fedllm.models.loading import resolve_model_path
    from fedllm.report.plots import plot_baselines

    dump_config(config, run_dir / "config.yaml")
    if not quiet:
        console.print(f"[bold]fedllm[/] run [cyan]{run_dir}[/]")
    clock = time.perf_counter()
    phases: dict[str, float] = {}
    with console.status("Preparing the base model (first use pretrains it on public text)..."):
        resolve_model_path(config.model)
    phases["base_model_s"] = time.perf_counter() - clock
    federate(config, run_dir, quiet=quiet, target=target)
    phases["federation_s"] = time.perf_counter() - clock - sum(phases.values())
    report = read_report_json(run_dir)
    baselines: dict[str, Any] = {}
    comparison: dict[str, float] = {}
    if with_baselines and config.evaluation.baselines:
        baselines = run_baselines(config, run_dir, quiet=quiet)
        comparison = compare(report.get("final"), baselines)
        phases["baselines_s"] = time.perf_counter() - clock - sum(phases.values())
        plot_baselines(report, baselines, run_dir)
    summary = run_summary(baselines, comparison, phases)
    write_summary(run_dir, summary)
    return with_summary(report, summary)


def federate(
    config: ExperimentConfig,
    run_dir: Path,
    *,
    quiet: bool,
    target: DeployedFederation | None = None,
) -> None:
    """Run the Flower app on a private local SuperLink (or the deployed ``target``), showing
    per-round progress from the ServerApp's events in ``flwr run``'s output.

    The ServerApp gets the validated experiment itself (``experiment``), not a file to parse.
    """
    flwr_home = run_dir / ".flwr"
    log_path = run_dir / "flower.log"
    resources = SimulationResources(num_supernodes=config.federation.num_hospitals)
    run_config = {EXPERIMENT: experiment_json(config), "run-dir": str(run_dir)}
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("round {task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        task = progress.add_task("starting Flower SuperLink and hospitals", total=config.run.rounds)
        show = functools.partial(_show_progress, progress, task)
        if target is None:
            with local_superlink(flwr_home, log_path):
                run_app(APP_ROOT, flwr_home, run_config, resources, log_path, on_line=show)
        else:
            target.connect(flwr_home)
            run_app(
                APP_ROOT,
                flwr_home,
                run_config,
                None,
                log_path,
                connection=target.name,
                on_line=show,
            )
    report = read_report_json(run_dir)
    if report["status"] not in ("completed", "degraded"):
        raise FederationError(
            f"the federated run ended with status '{report['status']}'"
            f" ({report.get('error', 'no error recorded')}); see {log_path}" + _causes(report)
        )


def _causes(report: dict[str, Any]) -> str:
    """One indented line per hospital that failed or was lost."""
    return "".join(f"\n  {cause}" for cause in report.get("causes") or [])


def run_baselines(config: ExperimentConfig, run_dir: Path, *, quiet: bool) -> dict[str, Any]:
    """The configured baselines, each in its own sub-directory where it writes anything."""
    from fedllm.federation.baselines import run_centralized_baseline

    results: dict[str, Any] = {}
    for name in config.evaluation.baselines:
        if not quiet:
            console.print(f"Baseline [bold]{name}[/] ...")
        if name == "centralized":
            results[name] = run_centralized_baseline(config)
        else:
            no_dp = config.model_copy(
                update={"privacy": config.privacy.model_copy(update={"enabled": False})}
            )
            sub_dir = run_dir / "baselines" / name
            sub_dir.mkdir(parents=True, exist_ok=True)
            dump_config(no_dp, sub_dir / "config.yaml")
            federate(no_dp, sub_dir, quiet=quiet)
            final = read_report_json(sub_dir)["final"]
            results[name] = {**final, "run_dir": str(sub_dir)}
    return results


def compare(final_figures: dict[str, Any] | None, baselines: dict[str, Any]) -> dict[str, float]:
    """Final perplexity over each baseline's: the price of DP and of federation."""
    final = (final_figures or {}).get("perplexity")
    ratios = {}
    for name, baseline in baselines.items():
        reference = baseline.get("perplexity")
        if final is not None and reference:
            ratios[f"perplexity_over_{name}"] = round(final / reference, 4)
    return ratios


def show_summary(report: dict[str, Any], run_dir: Path) -> None:
    """Per-hospital privacy table and the perplexity comparison."""
    privacy = report["privacy"]
    if privacy["enabled"]:
        table = Table(
            title=f"Privacy per hospital (δ={privacy['delta']}, accountant={privacy['accountant']},"
            f" unit={privacy['unit']}, {privacy.get('neighbouring')} neighbours)"
        )
        for column in ("hospital", "ε", "cap", "σ", "q", "steps", "rounds"):
            table.add_column(column, justify="right")
        unconfirmed = False
        for name, state in privacy["hospitals"].items():
            confirmed = state.get("epsilon_confirmed", True)
            unconfirmed |= not confirmed
            table.add_row(
                name,
                _fmt(state["epsilon"]) + ("" if confirmed else " ≤"),
                _fmt(state["epsilon_cap"]),
                _fmt(state["noise_multiplier"]),
                _fmt(state["sample_rate"]),
                _count(state["steps"]),
                _count(state["rounds_participated"]),
            )
        console.print(table)
        if unconfirmed:
            console.print(
                "≤: the hospital's last round was lost or failed; ε is its own projection for "
                "that round, an upper bound (see docs/report.md)."
            )
    results = Table(title="Held-out perplexity")
    results.add_column("model")
    results.add_column("perplexity", justify="right")
    if report.get("initial"):
        results.add_row("base model (before federation)", _fmt(report["initial"]["perplexity"]))
    if report.get("final"):
        label = "federated + DP" if privacy["enabled"] else "federated"
        results.add_row(label, _fmt(report["final"]["perplexity"]))
    for name, baseline in (report.get("baselines") or {}).items():
        results.add_row(f"baseline: {name}", _fmt(baseline.get("perplexity")))
    console.print(results)
    for key, value in (report.get("comparison") or {}).items():
        console.print(f"{key.replace('_', ' ')}: [bold]{value:.3f}×[/]")
    console.print(
        f"Report: [cyan]{run_dir / REPORT_FILE}[/]  summary: {SUMMARY_FILE}"
        "  plots: perplexity.png, epsilon.png"
        + (", comparison.png" if report.get("baselines") else "")
    )


def _show_progress(progress: Progress, task: TaskID, line: str) -> None:
    """Move the rounds' bar when a line of ``flwr run``'s output is a ServerApp progress event."""
    event = progress_event(line)
    if event is None:
        return
    if event["event"] == STARTED_EVENT:
        progress.update(task, description="federated training")
        return
    progress.update(
        task,
        completed=event["round"],
        total=event["rounds"],
        description=(
            f"cohort {event['cohort']} | ppl {_fmt(event['perplexity'])}"
            f" | max ε {_fmt(event['max_epsilon'])}"
        ),
    )


def _count(value: int | None) -> str:
    return "—" if value is None else str(value)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.4g}"
