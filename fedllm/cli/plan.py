"""``fedllm privacy plan``: every hospital's σ and projected ε for a config, before training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedllm.cli.common import console, fail, print_json
from fedllm.config import ConfigError, load_config
from fedllm.data import DataError
from fedllm.federation.hospital_data import hospital_data, training_texts
from fedllm.privacy.accountant import HOSPITAL_NEIGHBOURING, compute_epsilon
from fedllm.privacy.plan import plan_hospital


def plan_command(
    config_file: Annotated[Path, typer.Argument(help="Experiment YAML")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Print each hospital's noise multiplier and projected ε for the whole run."""
    try:
        config = load_config(config_file, overrides or [])
        if not config.privacy.enabled:
            fail("privacy.enabled is false in this config: no hospital has a DP guarantee")
        rows = []
        for index, profile in enumerate(config.federation.profiles()):
            units = len(training_texts(hospital_data(config, index).train, config.privacy.unit))
            plan = plan_hospital(config, profile.name, units, profile.epsilon_cap)
            projected = plan.epsilon_after(plan.planned_rounds)
            rows.append(
                {
                    "hospital": profile.name,
                    "units": units,
                    "sample_rate": plan.sample_rate,
                    "steps_per_round": plan.steps_per_round,
                    "planned_rounds": plan.planned_rounds,
                    "noise_multiplier": plan.noise_multiplier,
                    "epsilon_per_round": compute_epsilon(
                        plan.round_events(), plan.delta, plan.accountant
                    ),
                    "projected_epsilon": projected,
                    "epsilon_cap": plan.epsilon_cap,
                }
            )
    except (ConfigError, DataError, ValueError) as error:
        fail(str(error))
    if json_output:
        print_json(
            {
                "delta": config.privacy.delta,
                "accountant": config.privacy.accountant,
                "neighbouring": HOSPITAL_NEIGHBOURING,
                "unit": config.privacy.unit,
                "evaluation": config.evaluation.release,
                "hospitals": rows,
            }
        )
        return
    table = Table(
        title=f"Privacy plan: δ={config.privacy.delta}, accountant={config.privacy.accountant},"
        f" {HOSPITAL_NEIGHBOURING} neighbours, unit={config.privacy.unit},"
        f" evaluation={config.evaluation.release}"
    )
    headers = ("hospital", "units", "q", "steps/round", "rounds", "σ", "ε/round", "ε total", "cap")
    for header in headers:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(
            row["hospital"],
            str(row["units"]),
            f"{row['sample_rate']:.4f}",
            str(row["steps_per_round"]),
            str(row["planned_rounds"]),
            f"{row['noise_multiplier']:.4f}",
            f"{row['epsilon_per_round']:.3f}",
            f"{row['projected_epsilon']:.3f}",
            f"{row['epsilon_cap']:.3f}",
        )
    console.print(table)
