"""A hospital's privacy plan for a run: its sampling rate, noise multiplier and projected ε.

The cost of a round is known before it starts (σ, q and the number of steps are fixed, and so
are the noised statistics a hospital releases for the server's selection), so both the
hospital and the server can tell in advance whether a round fits under the cap, and a
researcher can read every hospital's projected ε before anything trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedllm.config.schema import ExperimentConfig
from fedllm.privacy.accountant import compute_epsilon
from fedllm.privacy.calibration import calibrate_noise_multiplier
from fedllm.privacy.events import (
    GaussianRelease,
    PrivacyEvent,
    SampledGaussianSteps,
    sample_rate_for,
)


class UnreachableTargetError(ValueError):
    """No noise multiplier meets ``privacy.target_epsilon``; the message says why."""


@dataclass(frozen=True)
class HospitalPrivacyPlan:
    """How one hospital's DP-SGD and statistics releases are parameterised for the whole run.

    ``utility_release`` is the Gaussian release of the noised loss statistic that a hospital
    sends with each round's update when the server selects by utility; ``profile_release`` is
    the one-off release of its noised data profile (specialty counts) used for redundancy;
    ``evaluation_release`` is the noised held-out loss it returns each time it evaluates
    (``evaluations`` times a run: before round 1 and after each round).
    """

    hospital: str
    num_units: int
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    noise_multiplier: float
    epsilon_cap: float
    delta: float
    accountant: str
    utility_release: GaussianRelease | None = None
    profile_release: GaussianRelease | None = None
    evaluation_release: GaussianRelease | None = None
    evaluations: int = 0

    def round_events(self) -> list[PrivacyEvent]:
        """The privacy events one round adds to the hospital's ledger."""
        steps: list[PrivacyEvent] = [
            SampledGaussianSteps(self.noise_multiplier, self.sample_rate, self.steps_per_round)
        ]
        return steps + ([self.utility_release] if self.utility_release else [])

    def one_off_events(self) -> list[PrivacyEvent]:
        """Events released once per run, before the first round."""
        return [self.profile_release] if self.profile_release else []

    def evaluation_events(self) -> list[PrivacyEvent]:
        """The event one evaluation adds to the ledger (none when evaluation is not DP)."""
        return [self.evaluation_release] if self.evaluation_release else []

    def epsilon_after(self, rounds: int) -> float:
        """ε after ``rounds`` rounds of this run and all its evaluations (from a fresh ledger)."""
        evaluations = self.evaluations * self.evaluation_events()
        return compute_epsilon(
            self.one_off_events() + rounds * self.round_events() + evaluations,
            self.delta,
            self.accountant,
        )


def plan_hospital(
    config: ExperimentConfig, hospital: str, num_units: int, epsilon_cap: float | None
) -> HospitalPrivacyPlan:
    """Derive σ for a hospital holding ``num_units`` sampling units (records or patients)."""
    privacy = config.privacy
    if not privacy.enabled:
        raise ValueError("privacy is disabled in this config: there is no DP plan to make")
    if num_units < 1:
        raise ValueError(f"hospital {hospital} holds no training records: it cannot train")
    sample_rate = sample_rate_for(config.training.batch_size, num_units)
    planned_rounds = privacy.planned_rounds or config.run.rounds
    steps = config.training.local_steps
    utility, profile, evaluation, evaluations = _statistic_releases(config)
    if privacy.noise_multiplier is not None:
        sigma = privacy.noise_multiplier
    else:
        reason = unreachable_target(config)
        if reason is not None:
            raise UnreachableTargetError(f"hospital {hospital}: {reason}")
        try:
            sigma = calibrate_noise_multiplier(
                privacy.target_epsilon,
                privacy.delta,
                sample_rate,
                steps * planned_rounds,
                privacy.accountant,
                fixed_events=fixed_releases(config),
            )
        except ValueError as error:
            raise UnreachableTargetError(
                f"hospital {hospital}: privacy.target_epsilon {privacy.target_epsilon:g} with "
                f"q={sample_rate:.4g} ({num_units} units) over {steps * planned_rounds} steps: "
                f"{error}"
            ) from None
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
        utility_release=utility,
        profile_release=profile,
        evaluation_release=evaluation,
        evaluations=evaluations,
    )


def _statistic_releases(
    config: ExperimentConfig,
) -> tuple[GaussianRelease | None, GaussianRelease | None, GaussianRelease | None, int]:
    """One utility-statistic release, the profile release, one evaluation release (each None
    when the run makes none) and the number of evaluations a hospital releases."""
    strategy = config.strategy
    utility = (
        GaussianRelease(strategy.utility_noise_multiplier, purpose="utility")
        if config.needs_utility_statistics
        else None
    )
    profile = (
        GaussianRelease(strategy.profile_noise_multiplier, purpose="profile")
        if config.needs_profiles
        else None
    )
    evaluations = config.evaluations_per_run if config.evaluation.release == "dp" else 0
    evaluation = (
        GaussianRelease(config.evaluation.noise_multiplier, purpose="evaluation")
        if evaluations
        else None
    )
    return utility, profile, evaluation, evaluations


def fixed_releases(config: ExperimentConfig) -> list[GaussianRelease]:
    """Every release a hospital plans besides DP-SGD, whatever σ it trains with: the noised
    loss statistic of each planned round, the noised profile, the noised evaluations."""
    utility, profile, evaluation, evaluations = _statistic_releases(config)
    planned_rounds = config.privacy.planned_rounds or config.run.rounds
    releases = [replace(utility, count=planned_rounds)] if utility else []
    if evaluation is not None:
        releases.append(replace(evaluation, count=evaluations))
    return releases + ([profile] if profile else [])


def unreachable_target(config: ExperimentConfig) -> str | None:
    """Why no σ can meet ``privacy.target_epsilon``, or None when one can.

    The fixed releases are charged whatever σ DP-SGD uses, and DP-SGD's own ε only falls
    towards 0 as σ grows, so the target is reachable exactly when they alone cost less.
    The reason names the releases and the keys that set their noise.
    """
    privacy = config.privacy
    releases = fixed_releases(config)
    if not privacy.enabled or privacy.target_epsilon is None or not releases:
        return None
    cost = compute_epsilon(releases, privacy.delta, privacy.accountant)
    if cost < privacy.target_epsilon:
        return None
    selection = [release for release in releases if release.purpose != "evaluation"]
    kinds = (["the selection-statistic releases"] if selection else []) + (
        ["the DP evaluations"] if len(selection) < len(releases) else []
    )
    keys = {
        "utility": ("noised loss statistic", "strategy.utility_noise_multiplier"),
        "profile": ("noised data profile", "strategy.profile_noise_multiplier"),
        "evaluation": ("noised evaluation", "evaluation.noise_multiplier"),
    }
    parts = []
    for release in releases:
        label, key = keys[release.purpose]
        plural = "s" if release.count > 1 else ""
        parts.append(f"{release.count} {label}{plural}, {key}={release.noise_multiplier:g}")
    return (
        f"{' and '.join(kinds)} alone cost ε={cost:.3g} >= target {privacy.target_epsilon:g} "
        f"(δ={privacy.delta:g}; {'; '.join(parts)}): raise privacy.target_epsilon or those "
        "noise multipliers, or release less (fewer rounds, evaluation.release: off)"
    )
