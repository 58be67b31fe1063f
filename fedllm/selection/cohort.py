"""The round's cohort as the strategy records it: members, inclusion probabilities, solver.

Always taking the single best cohort would make selection deterministic: hospitals outside it
would have inclusion probability 0 and no aggregation could be unbiased for them. So the
cohort is *drawn* from the solver's low-energy ensemble with the ensemble's own Boltzmann
weights, and each hospital's π_i is the probability of exactly that draw
(:class:`~fedllm.selection.solvers.SelectionResult`). The other selection modes (a uniform
draw, Oort's top-K) and the uniform mixture that bounds every π_i from below live here too, and
:class:`CohortSampler` chooses between them by the strategy's ``selection``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedllm.selection.instance import CohortInstance
from fedllm.selection.solvers import SelectionResult


@dataclass(frozen=True)
class Cohort:
    """The hospitals asked to train and everyone's probability of having been asked."""

    members: frozenset[str]
    inclusion_probabilities: dict[str, float]
    solver: str


def qubo_instance(
    utilities: Mapping[str, float],
    similarity: np.ndarray,
    eligible: Sequence[str],
    names: Sequence[str],
    size: int,
    lam: float,
) -> CohortInstance:
    """The round's cohort QUBO over every hospital in ``names`` (0 utility if ineligible)."""
    allowed = set(eligible)
    return CohortInstance(
        utility=np.array([utilities.get(name, 0.0) for name in names]),
        similarity=similarity,
        k=size,
        lam=lam,
        eligible=np.array([name in allowed for name in names]),
    )


def draw_cohort(result: SelectionResult, names: Sequence[str], rng: np.random.Generator) -> Cohort:
    """Draw one cohort from the ensemble; π_i from the same distribution."""
    chosen = result.draw(rng)
    return Cohort(
        frozenset(names[i] for i in chosen),
        {name: float(result.inclusion_probabilities[i]) for i, name in enumerate(names)},
        result.solver,
    )


def no_cohort(names: Sequence[str]) -> Cohort:
    """The empty cohort of a round no hospital can afford: every π_i is 0."""
    return Cohort(frozenset(), dict.fromkeys(names, 0.0), "none")


def uniform_cohort(
    eligible: Sequence[str], names: Sequence[str], size: int, rng: random.Random
) -> Cohort:
    """``size`` of the eligible hospitals drawn uniformly: π_i = size / |eligible|, else 0.

    The one data-independent selection (server-side DP accounts it with sensitivity 2C, not
    the data-dependent bound); ``names`` is every hospital the round knows of.
    """
    chosen = rng.sample(list(eligible), size)
    probability = size / len(eligible)
    allowed = set(eligible)
    return Cohort(
        frozenset(chosen),
        {name: (probability if name in allowed else 0.0) for name in names},
        "uniform",
    )


def top_k_cohort(utilities: Mapping[str, float], names: Sequence[str], size: int) -> Cohort:
    """Oort's deterministic choice: the ``size`` highest utilities; π_i is 1 or 0.

    ``utilities`` holds the eligible hospitals only; ties keep the order of ``utilities``.
    """
    ranked = sorted(utilities, key=lambda name: utilities[name], reverse=True)[:size]
    return Cohort(frozenset(ranked), {name: float(name in ranked) for name in names}, "top-k")


def mix_with_uniform(
    cohort: Cohort, eligible: Sequence[str], size: int, mix: float, rng: random.Random
) -> Cohort:
    """With probability ``mix`` replace ``cohort`` by a uniform one of ``size``; exact π.

    π_i = (1 − m)·π_i(cohort) + m·K/|eligible|: the mixture is still a known distribution,
    so n_i/π_i aggregation stays unbiased, and no eligible hospital's π falls below
    m·K/|eligible|, which bounds its weight. ``mix`` = 0 returns ``cohort`` and draws nothing.
    """
    if mix == 0:
        return cohort
    members = cohort.members
    if rng.random() < mix:
        members = frozenset(rng.sample(list(eligible), size))
    uniform = size / len(eligible)
    probabilities = {
        name: (1 - mix) * p + (mix * uniform if name in eligible else 0.0)
        for name, p in cohort.inclusion_probabilities.items()
    }
    return Cohort(members, probabilities, cohort.solver)


@dataclass
class CohortSampler:
    """The randomness of cohort selection and the uniform mix ``m`` (``strategy.uniform_mix``).

    Seeded from ``run.seed`` (plus the rounds a resumed run already held) so that a run's
    cohorts can be replayed; it decides who is asked, never any DP noise.
    """

    rng: random.Random
    ensemble_rng: np.random.Generator
    uniform_mix: float

    @classmethod
    def seeded(cls, seed: int, uniform_mix: float) -> CohortSampler:
        """Both generators from one seed."""
        return cls(random.Random(seed), np.random.default_rng(seed), uniform_mix)

    def choose(
        self,
        selection: str,
        eligible: Sequence[str],
        names: Sequence[str],
        size: int,
        utilities: Mapping[str, float],
        solve: Callable[[], SelectionResult],
    ) -> Cohort:
        """The cohort of ``size`` (≤ |eligible|) by ``selection``; ``names`` is everyone.

        ``random`` draws uniformly, ``oort`` takes the top utilities, and ``quantum`` /
        ``exact`` draw from ``solve()``'s ensemble, then mix with a uniform draw.
        """
        if size == 0:
            return no_cohort(names)
        if selection == "random":
            return uniform_cohort(eligible, names, size, self.rng)
        if selection == "oort":
            return top_k_cohort(utilities, names, size)
        drawn = draw_cohort(solve(), names, self.ensemble_rng)
        return mix_with_uniform(drawn, eligible, size, self.uniform_mix, self.rng)
