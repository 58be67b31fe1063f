"""``fedllm privacy``: ε of a DP-SGD schedule, and the σ that meets an ε target.

These let a researcher or a hospital's privacy officer check numbers by hand with exactly the
accountant the ledgers use, instead of trusting a table in a paper.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import typer

from fedllm.cli.common import console, fail, print_json
from fedllm.cli.lazy import LazyCommand, LazyGroup
from fedllm.privacy.accountant import (
    ACCOUNTANTS,
    HOSPITAL_NEIGHBOURING,
    MAX_LOSS_GRID_POINTS,
    NEIGHBOURING_RELATIONS,
    PLD_VALUE_DISCRETIZATION_INTERVAL,
    check_accountant,
    check_delta,
    check_loss_grid,
    check_neighbouring,
    compute_epsilon,
    least_tractable_noise,
)
from fedllm.privacy.calibration import MIN_NOISE_MULTIPLIER, calibrate_noise_multiplier
from fedllm.privacy.events import SampledGaussianSteps


class PrivacyGroup(LazyGroup):
    """``plan`` reads a config and hospital data (torch and transformers): imported only to run."""

    lazy_commands: ClassVar[dict[str, LazyCommand]] = {
        "plan": LazyCommand(
            "fedllm.cli.plan:plan_command",
            "Print each hospital's noise multiplier and projected ε for the whole run.",
        ),
        "audit": LazyCommand(
            "fedllm.cli.audit_privacy:audit_privacy_command",
            "Plant canaries, run the config's federation in-process, and bound ε from the attack.",
        ),
    }


privacy_app = typer.Typer(
    name="privacy",
    cls=PrivacyGroup,
    help="Unit-level privacy accounting for DP-SGD (ε from σ, or σ from a target ε).",
    no_args_is_help=True,
)

SampleRate = Annotated[
    float, typer.Option("--sample-rate", help="Poisson sampling rate q per step, in (0, 1]")
]
Steps = Annotated[int, typer.Option("--steps", help="Number of DP-SGD steps")]
Delta = Annotated[float, typer.Option("--delta", help="Target δ, in (0, 1)")]
Accountant = Annotated[
    str, typer.Option("--accountant", help=f"Accountant: {', '.join(ACCOUNTANTS)}")
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print one JSON object")]
Neighbouring = Annotated[
    str,
    typer.Option(
        "--neighbouring",
        help=(
            f"Neighbouring relation: {', '.join(NEIGHBOURING_RELATIONS)} (replace-one, the "
            "relation of fedllm's hospitals, whose dataset sizes are public, needs pld)"
        ),
    ),
]


def _finite(epsilon: float, accountant: str) -> float:
    """Refuse to print an unbounded ε as if it were a guarantee."""
    if not math.isfinite(epsilon):
        fail(f"the {accountant} accountant cannot bound ε for these parameters")
    return epsilon


@privacy_app.command("epsilon")
def epsilon_command(
    noise_multiplier: Annotated[
        float, typer.Option("--noise-multiplier", help="Noise multiplier σ (> 0)")
    ],
    sample_rate: SampleRate,
    steps: Steps,
    delta: Delta,
    accountant: Accountant = "pld",
    neighbouring: Neighbouring = HOSPITAL_NEIGHBOURING,
    json_output: JsonOutput = False,
) -> None:
    """Print ε after a number of Poisson-sampled Gaussian DP-SGD steps, at δ."""
    try:
        event = SampledGaussianSteps(noise_multiplier, sample_rate, steps)
        check_loss_grid(event, accountant, neighbouring)
        epsilon = _finite(
            compute_epsilon([event], delta, accountant, neighbouring=neighbouring), accountant
        )
    except (ValueError, ArithmeticError) as error:
        fail(str(error))
    if json_output:
        print_json(
            {
                "epsilon": epsilon,
                "delta": delta,
                "noise_multiplier": noise_multiplier,
                "sample_rate": sample_rate,
                "steps": steps,
                "accountant": accountant,
                "neighbouring": neighbouring,
            }
        )
        return
    console.print(
        f"ε = [bold]{epsilon:.6g}[/] at δ = {delta:g} ({accountant}, {neighbouring}; "
        f"σ = {noise_multiplier:g}, q = {sample_rate:g}, {steps} steps)",
        highlight=False,
    )


# A PLD 100 times coarser than reported ones: a cheap, pessimistic ε for the guard below.
_GUARD_PLD_INTERVAL = 100 * PLD_VALUE_DISCRETIZATION_INTERVAL


def _refuse_runaway_calibration(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    neighbouring: str,
) -> None:
    """Raise ValueError when only noise too small to account for meets the target.

    Calibration searches σ downward; below `least_tractable_noise` the privacy-loss grid
    outgrows memory, and if even a pessimistic ε there is within the target, the smallest σ
    that meets it lies below (σ = 0.1 at q = 0.5 over 1000 steps did not finish in minutes).
    Invalid arguments are left to the calibration's own one-line errors.
    """
    if accountant == "rdp" or not (math.isfinite(target_epsilon) and target_epsilon > 0):
        return
    check_accountant(accountant)
    check_neighbouring(accountant, neighbouring)
    check_delta(delta)
    floor = least_tractable_noise(sample_rate, steps, neighbouring, MIN_NOISE_MULTIPLIER)
    if floor == MIN_NOISE_MULTIPLIER:
        return
    if math.isinf(floor):
        raise ValueError(
            f"sample_rate {sample_rate:g} over {steps} steps spreads the privacy loss over more "
            f"than {MAX_LOSS_GRID_POINTS:.0e} grid points even at σ = 1000: take fewer steps"
        )
    event = SampledGaussianSteps(floor, sample_rate, steps)
    bound = compute_epsilon(
        [event], delta, "pld", pld_interval=_GUARD_PLD_INTERVAL, neighbouring=neighbouring
    )
    if bound <= target_epsilon:
        raise ValueError(
            f"target_epsilon {target_epsilon:g} at sample_rate {sample_rate:g} over {steps} "
            f"steps needs less noise than σ = {floor:.3g}, which already gives ε <= "
            f"{bound:.4g}; below it the privacy loss spreads over more than "
            f"{MAX_LOSS_GRID_POINTS:.0e} grid points, which the {accountant} accountant cannot "
            f"compute in reasonable time: choose a target below {bound:.4g}"
        )


@privacy_app.command("calibrate")
def calibrate_command(
    target_epsilon: Annotated[
        float, typer.Option("--target-epsilon", help="ε the schedule may not exceed (> 0)")
    ],
    sample_rate: SampleRate,
    steps: Steps,
    delta: Delta,
    accountant: Accountant = "pld",
    neighbouring: Neighbouring = HOSPITAL_NEIGHBOURING,
    json_output: JsonOutput = False,
) -> None:
    """Print the smallest noise multiplier σ whose ε stays within the target."""
    try:
        _refuse_runaway_calibration(
            target_epsilon, delta, sample_rate, steps, accountant, neighbouring
        )
        sigma = calibrate_noise_multiplier(
            target_epsilon, delta, sample_rate, steps, accountant, neighbouring=neighbouring
        )
        event = SampledGaussianSteps(sigma, sample_rate, steps)
        epsilon = _finite(
            compute_epsilon([event], delta, accountant, neighbouring=neighbouring), accountant
        )
    except (ValueError, ArithmeticError) as error:
        fail(str(error))
    if json_output:
        print_json(
            {
                "noise_multiplier": sigma,
                "epsilon": epsilon,
                "target_epsilon": target_epsilon,
                "delta": delta,
                "sample_rate": sample_rate,
                "steps": steps,
                "accountant": accountant,
                "neighbouring": neighbouring,
            }
        )
        return
    console.print(
        f"σ = [bold]{sigma:.6g}[/] gives ε = {epsilon:.6g} <= {target_epsilon:g} at "
        f"δ = {delta:g} ({accountant}, {neighbouring}; q = {sample_rate:g}, {steps} steps)",
        highlight=False,
    )
