"""Cohort selection: which hospitals train each round, as a cardinality-constrained QUBO.

Maximise ``Σ u_i x_i − λ Σ_{i<j} s_ij x_i x_j`` subject to ``Σ x_i = K`` and ineligible
hospitals excluded. Callers import from here; see ``docs/selection.md`` for the model, the
solvers and the measurements behind the default.
"""

from fedllm.selection.annealing import AnnealingSchedule, anneal, swap_descent
from fedllm.selection.exact import solve_exact
from fedllm.selection.instance import (
    CohortInstance,
    InstanceError,
    instance_from_dict,
    instance_to_dict,
    load_instance,
    synthetic_instance,
)
from fedllm.selection.qubo import (
    add_cardinality_penalty,
    build_cohort_bqm,
    cohort_objective,
    dominance_mask,
    penalty_strength,
    repair,
)
from fedllm.selection.solvers import ALL_SOLVERS, DEFAULT_SOLVER, SelectionResult, solve

__all__ = [
    "ALL_SOLVERS",
    "DEFAULT_SOLVER",
    "AnnealingSchedule",
    "CohortInstance",
    "InstanceError",
    "SelectionResult",
    "add_cardinality_penalty",
    "anneal",
    "build_cohort_bqm",
    "cohort_objective",
    "dominance_mask",
    "instance_from_dict",
    "instance_to_dict",
    "load_instance",
    "penalty_strength",
    "repair",
    "solve",
    "solve_exact",
    "swap_descent",
    "synthetic_instance",
]
