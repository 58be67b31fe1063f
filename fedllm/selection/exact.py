"""The reference solver: the cohort problem as a mixed-integer linear program for HiGHS.

Linearisation: one continuous ``y_ij`` per redundant pair (``s_ij > 0``) with
``y_ij ≥ x_i + x_j − 1`` and ``y_ij ≥ 0``, minimising ``−Σ u_i x_i + λ Σ s_ij y_ij``. The usual
upper bounds ``y_ij ≤ x_i``, ``y_ij ≤ x_j`` are not needed: each ``y_ij`` has a non-negative
cost ``λ s_ij``, so at the optimum it sits on its largest lower bound, which is exactly
``x_i x_j`` for binary ``x``. Pairs with ``s_ij = 0`` cost nothing and get no variable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from fedllm.selection.instance import CohortInstance, InstanceError
from fedllm.selection.qubo import cohort_objective, reduced_instance, redundant_pairs


@dataclass(frozen=True)
class MilpOutcome:
    """What HiGHS found: the best cohort, whether it is proven optimal, and the dual bound."""

    selected: np.ndarray
    objective: float
    proven: bool
    bound: float


def solve_exact(
    instance: CohortInstance, time_limit: float | None = None, reduce: bool = True
) -> np.ndarray:
    """Indices of an optimal cohort, ascending.

    ``reduce`` first drops hospitals that provably belong to no optimum
    (:func:`fedllm.selection.qubo.dominance_mask`), which keeps the MILP small. Raises
    :class:`InstanceError` if HiGHS stops (time limit) without proving optimality.
    """
    outcome = solve_milp(instance, time_limit, reduce)
    if not outcome.proven:
        raise InstanceError(
            f"exact solver did not prove optimality within {time_limit} s"
            f" (best {outcome.objective:.6g}, bound {outcome.bound:.6g})"
        )
    return outcome.selected


def solve_milp(
    instance: CohortInstance, time_limit: float | None = None, reduce: bool = True
) -> MilpOutcome:
    """Run HiGHS and report its incumbent even when the time limit stops it (for benchmarks)."""
    work = reduced_instance(instance) if reduce else instance
    variables = work.eligible_indices
    position = np.full(work.n, -1)
    position[variables] = np.arange(variables.size)
    rows, cols, values = redundant_pairs(work.similarity, work.eligible)
    n_x, n_y = variables.size, rows.size
    cost = np.concatenate([-work.utility[variables], work.lam * values])
    pair = np.arange(n_y)
    # y_p - x_i - x_j >= -1 for each pair p = (i, j).
    linking = sp.csr_array(
        (
            np.concatenate([np.ones(n_y), -np.ones(2 * n_y)]),
            (np.tile(pair, 3), np.concatenate([n_x + pair, position[rows], position[cols]])),
        ),
        shape=(n_y, n_x + n_y),
    )
    cardinality = sp.csr_array(
        (np.ones(n_x), (np.zeros(n_x, dtype=int), np.arange(n_x))), shape=(1, n_x + n_y)
    )
    constraints = [LinearConstraint(cardinality, work.k, work.k)]
    if n_y:
        constraints.append(LinearConstraint(linking, -1.0, np.inf))
    integrality = np.concatenate([np.ones(n_x), np.zeros(n_y)])
    upper = np.concatenate([np.ones(n_x), np.full(n_y, np.inf)])
    options = {} if time_limit is None else {"time_limit": float(time_limit)}
    result = milp(
        cost,
        constraints=constraints,
        integrality=integrality,
        bounds=Bounds(np.zeros(n_x + n_y), upper),
        options=options,
    )
    if result.x is None:
        raise InstanceError(f"exact solver found no cohort: {result.message}")
    selected = np.sort(variables[np.round(result.x[:n_x]) == 1])
    objective = cohort_objective(instance.utility, instance.similarity, instance.lam, selected)
    bound = -float(getattr(result, "mip_dual_bound", -objective) or -objective)
    return MilpOutcome(selected, objective, result.status == 0, bound)
