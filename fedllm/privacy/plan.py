"""A hospital's privacy plan for a run: its sampling rate, noise multiplier and projected ε.

The cost of a round is known before it starts (σ, q and the number of steps are fixed), so
both the hospital and the server can tell in advance whether a round fits under the cap, and
a researcher can read every hospital's projected ε before anything trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedllm.config.schema import ExperimentConfig
from fedllm.privacy.accountant import compute_epsilon
from fedllm.privacy.calibration import calibrate_noise_multiplier
from fedllm.privacy.events import SampledGaussianSteps
from fedllm.training.local import sample_rate_for


@dataclass(frozen=True)
class HospitalPrivacyPlan:
    """How one hospital's DP-SGD is parameterised for the whole run."""

    hospital: str
    num_units: int
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    noise_multiplier: float
    epsilon_cap: float
    delta: float
    accountant: str

    def round_events(self) -> list[SampledGaussianSteps]:
        """The privacy events one round of local training adds to the hospital's ledger."""
        return [SampledGaussianSteps(self.noise_multiplier, self.sample_rate, self.steps_per_round)]

    def epsilon_after(self, rounds: int) -> float:
        """ε after taking part in ``rounds`` rounds of this run (from a fresh ledger)."""
        if rounds == 0:
            return 0.0
        events = [
            SampledGaussianSteps(
                self.noise_multiplier, self.sample_rate, self.steps_per_round * rounds
            )
        ]
        return compute_epsilon(events, self.delta, self.accountant)


def plan_hospital(
    config: ExperimentConfig, hospital: str, num_units: int, epsilon_cap: float | None
) -> HospitalPrivacyPlan:
    """Derive σ for a hospital holding ``num_units`` sampling units (records or patients)."""
    privacy = config.privacy
    if not privacy.enabled:
        raise ValueError("privacy is disabled in this config: there is no DP plan to make")
    sample_rate = sample_rate_for(config.training.batch_size, num_units)
    planned_rounds = privacy.planned_rounds or config.run.rounds
    steps = config.training.local_steps
    if privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
    else:
        sigma = calibrate_noise_multiplier(
            privacy.target_epsilon,
            privacy.delta,
            sample_rate,
            steps * planned_rounds,
            privacy.accountant,
        )
    cap = epsilon_cap if epsilon_cap is not None else privacy.cap()
    return HospitalPrivacyPlan(
        hospital=hospital,
        num_units=num_units,
        sample_rate=sample_rate,
        steps_per_round=steps,
        planned_rounds=planned_rounds,
        noise_multiplier=sigma,
        epsilon_cap=cap if math.isfinite(cap) else math.inf,
        delta=privacy.delta,
        accountant=privacy.accountant,
    )
