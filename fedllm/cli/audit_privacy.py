"""``fedllm privacy audit``: the privacy an attacker actually gets, next to the reported ε.

Module-level imports stay light (typer and the CLI's console) so that ``fedllm --help`` does
not load torch; the audit itself is imported when the command runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from fedllm.cli.common import console, fail, print_json

MODES = ("whitebox", "blackbox")


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def audit_privacy_command(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Experiment YAML")],
    canaries: Annotated[
        int | None,
        typer.Option(
            "--canaries",
            help="Canary slots per audited hospital (>= 2; default 500 white-box, 32 black-box)",
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="whitebox: gradient canaries scored from the released updates; blackbox: "
            "text canaries scored by the final model's losses, calibrated by the base model's",
        ),
    ] = "whitebox",
    confidence: Annotated[
        float, typer.Option("--confidence", help="Confidence of the ε lower bound, in (0, 1)")
    ] = 0.95,
    hospital: Annotated[
        list[str] | None,
        typer.Option("--hospital", help="Audit only this hospital (repeatable; default: all)"),
    ] = None,
    baseline: Annotated[
        bool,
        typer.Option("--baseline/--no-baseline", help="Also audit the same federation without DP"),
    ] = True,
    runs: Annotated[
        int,
        typer.Option(
            "--runs",
            help="Independent audits of each federation (fresh canaries and coins); K >= 2 "
            "pools their guesses and adds the classic many-run Clopper–Pearson bound",
        ),
    ] = 1,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: KEY=VALUE")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Plant canaries, run the config's federation in-process, and bound ε from the attack."""
    if mode not in MODES:
        fail(f"--mode: got {mode!r}; expected one of {', '.join(MODES)}")
    from fedllm.audit.run import run_audit, write_audit
    from fedllm.config.loading import ConfigError, dump_config, load_config
    from fedllm.report.run_dir import allocate_run_dir

    try:
        config = load_config(config_path, overrides or [])
    except (ConfigError, OSError) as error:
        fail(str(error))
    try:
        audit = run_audit(
            config,
            mode=mode,  # type: ignore[arg-type]
            canaries=canaries,
            confidence=confidence,
            hospitals=hospital,
            baseline=baseline,
            runs=runs,
        )
    except ValueError as error:
        fail(str(error))
    run_dir = allocate_run_dir(config.run.output_dir, f"{config.run.name}-audit")
    dump_config(config, run_dir / "config.yaml")
    files = write_audit(audit, run_dir)
    if json_output:
        print_json({"run_dir": str(run_dir), **{k: v for k, v in audit.items() if k != "runs"}})
        return
    labels = {"dp": "DP run", "no_dp": "no DP"}
    for run, rows in audit["summary"].items():
        for name, row in rows.items():
            if "epsilon_lower_bound" not in row:
                continue
            console.print(
                f"{labels[run]:7} {name}: ε ≥ [bold]{_number(row['epsilon_lower_bound'])}[/] "
                f"at {confidence:.0%} (reported ε {_number(row['reported_epsilon'])}, "
                f"ratio {_number(row['ratio'])}), canary AUC {_number(row['canary_auc'])}, "
                f"membership AUC {_number(row['membership_auc'])}",
                highlight=False,
            )
            if "many_run_epsilon_lower_bound" in row:
                console.print(
                    f"{'':7} {name}: many-run (Clopper–Pearson) ε ≥ "
                    f"[bold]{_number(row['many_run_epsilon_lower_bound'])}[/] "
                    f"(ratio {_number(row['many_run_ratio'])})",
                    highlight=False,
                )
    console.print(
        f"{audit['mode']} audit, {audit['canaries']} canaries per hospital, "
        f"{audit['independent_runs']} run(s) pooled, "
        f"{audit['seconds']:.0f} s; wrote {', '.join(str(f) for f in files)}",
        highlight=False,
    )
