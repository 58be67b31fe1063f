"""``fedllm select``: choose one round's hospital cohort from an instance file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedllm.cli.common import console, fail, print_json
from fedllm.selection import DEFAULT_SOLVER, InstanceError, load_instance, solve


def select_command(
    instance: Annotated[Path, typer.Argument(help="Instance JSON: k, lambda, utility, similarity")],
    solver: Annotated[
        str, typer.Option(help="sqa-swap, sa-swap, exact, greedy, random, dwave-sa, ...")
    ] = DEFAULT_SOLVER,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same cohort)")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Pick K eligible hospitals maximising utility minus λ·redundancy, with inclusion odds."""
    try:
        problem = load_instance(instance)
        result = solve(problem, solver, seed=seed)
    except InstanceError as error:
        fail(escape(str(error)))
    if json_output:
        print_json(result.to_json())
        return
    table = Table(title=f"Cohort of {problem.k} from {problem.n} hospitals ({result.solver})")
    for header in ("hospital", "utility", "inclusion probability"):
        table.add_column(header, justify="right")
    for index in result.selected:
        table.add_row(
            str(index),
            f"{problem.utility[index]:.4g}",
            f"{result.inclusion_probabilities[index]:.3f}",
        )
    console.print(table)
    console.print(
        f"objective {result.objective:.6g} · {len(result.samples)} ensemble cohorts"
        f" at temperature {result.temperature:.3g} · {result.seconds * 1000:.1f} ms"
    )
