"""The round's cohort as the strategy records it: members, inclusion probabilities, solver.

Always taking the single best cohort would make selection deterministic: hospitals outside it
would have inclusion probability 0 and no aggregation could be unbiased for them. So the
cohort is *drawn* from the solver's low-energy ensemble with the ensemble's own Boltzmann
weights, and each hospital's π_i is the probability of exactly that draw
(:class:`~fedllm.selection.solvers.SelectionResult`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedllm.selection.solvers import SelectionResult


@dataclass(frozen=True)
class Cohort:
    """The hospitals asked to train and everyone's probability of having been asked."""

    members: frozenset[str]
    inclusion_probabilities: dict[str, float]
    solver: str


def draw_cohort(result: SelectionResult, names: Sequence[str], rng: np.random.Generator) -> Cohort:
    """Draw one cohort from the ensemble; π_i from the same distribution."""
    chosen = result.draw(rng)
    return Cohort(
        frozenset(names[i] for i in chosen),
        {name: float(result.inclusion_probabilities[i]) for i, name in enumerate(names)},
        result.solver,
    )
