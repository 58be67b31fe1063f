"""One entry point for every cohort solver, and the ensemble every solver returns.

``solve(instance, "sqa-swap")`` and ``solve(instance, "tabu")`` return the same
:class:`SelectionResult`, so benchmarks, the CLI and the federated server compare and swap
solvers by name alone. Solvers differ only in the candidate cohorts they find; turning those
into a best cohort, a Boltzmann ensemble and inclusion probabilities happens once, here.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import dimod
import numpy as np

from fedllm.selection.annealing import AnnealingSchedule, anneal
from fedllm.selection.exact import solve_exact
from fedllm.selection.instance import CohortInstance, InstanceError
from fedllm.selection.qubo import (
    add_cardinality_penalty,
    instance_bqm,
    objectives,
    penalty_strength,
    reduced_instance,
    repair,
    swap_neighbours,
)

DEFAULT_SOLVER = "sqa-swap"
DIMOD_SAMPLERS = {
    "dwave-sa": ("dwave.samplers", "SimulatedAnnealingSampler", {"num_reads": 16}),
    "dwave-pimc": ("dwave.samplers", "PathIntegralAnnealingSampler", {"num_reads": 16}),
    "tabu": ("dwave.samplers", "TabuSampler", {}),
}
ALL_SOLVERS = ("sqa-swap", "sa-swap", "exact", "greedy", "random", *DIMOD_SAMPLERS)
SMALL_EXACT_COHORTS = 5000
SMALL_EXACT_ELIGIBLE = 20


@dataclass(frozen=True)
class SelectionResult:
    """The chosen cohort plus the low-energy ensemble around it.

    ``samples`` are distinct cohorts (sorted index tuples) with their objectives, best first,
    (a one-swap neighbour may beat ``selected``, which is always the solver's own best answer)
    and ``sample_weights`` their Boltzmann weights ``∝ exp((objective − best) / temperature)``.
    ``inclusion_probabilities[i]`` is the weighted share of ensemble cohorts containing ``i``:
    the probability that hospital ``i`` takes part when the server draws a cohort with
    :meth:`draw`. It is 0 for ineligible hospitals and sums to K.
    """

    selected: tuple[int, ...]
    objective: float
    solver: str
    seconds: float
    samples: list[tuple[tuple[int, ...], float]]
    sample_weights: np.ndarray
    inclusion_probabilities: np.ndarray
    temperature: float
    details: dict[str, Any] = field(default_factory=dict)

    def draw(self, rng: np.random.Generator) -> tuple[int, ...]:
        """One cohort from the ensemble, so that hospital ``i`` joins with probability π_i."""
        return self.samples[int(rng.choice(len(self.samples), p=self.sample_weights))][0]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (what ``fedllm select --json`` prints)."""
        return {
            "selected": list(self.selected),
            "objective": self.objective,
            "solver": self.solver,
            "seconds": self.seconds,
            "inclusion_probabilities": self.inclusion_probabilities.tolist(),
            "temperature": self.temperature,
            "samples": [
                {"cohort": list(cohort), "objective": value, "weight": float(weight)}
                for (cohort, value), weight in zip(self.samples, self.sample_weights, strict=True)
            ],
            "details": self.details,
        }


@dataclass(frozen=True)
class _Found:
    """What a solver backend hands back: feasible cohorts as ``(R, N)`` bools, plus notes."""

    states: np.ndarray
    name: str
    details: dict[str, Any] = field(default_factory=dict)
    probabilities: np.ndarray | None = None


def solve(
    instance: CohortInstance,
    solver: str = DEFAULT_SOLVER,
    seed: int = 0,
    *,
    temperature_share: float = 0.01,
    max_samples: int = 64,
    **options: Any,
) -> SelectionResult:
    """Select a cohort with the named solver; ``options`` go to that solver.

    Names: see :data:`ALL_SOLVERS`, or ``"dimod:<module>.<Class>"`` for any dimod sampler.
    The ensemble temperature is ``temperature_share`` × the best cohort's total utility: a
    cohort worse by 1% of that (the default) weighs ``1/e`` of the best. ``max_samples``
    bounds the ensemble (distinct cohorts found, topped up with the best one-swap neighbours).
    """
    backend = _backend(solver)
    started = time.perf_counter()
    found = backend(instance, seed, **options)
    result = _ensemble(instance, found, temperature_share, max_samples)
    return replace(result, seconds=time.perf_counter() - started)


def _backend(solver: str) -> Callable[..., _Found]:
    """The function for a solver name, or an :class:`InstanceError` listing valid names."""
    backends: dict[str, Callable[..., _Found]] = {
        "sqa-swap": _solve_sqa,
        "sa-swap": _solve_sa,
        "exact": _solve_exact,
        "greedy": _solve_greedy,
        "random": _solve_random,
    }
    if solver in backends:
        return backends[solver]
    if solver in DIMOD_SAMPLERS:
        module, name, defaults = DIMOD_SAMPLERS[solver]
        return _dimod_backend(solver, module, name, defaults)
    if solver.startswith("dimod:") and "." in solver:
        module, _, name = solver.removeprefix("dimod:").rpartition(".")
        return _dimod_backend(solver, module, name, {})
    valid = ", ".join((*ALL_SOLVERS, "dimod:<module>.<Class>"))
    raise InstanceError(f"unknown solver {solver!r}; valid: {valid}")


def _is_small(instance: CohortInstance) -> bool:
    """Whether exact search is cheaper than annealing (few eligible or few cohorts)."""
    n_eligible = int(instance.eligible.sum())
    return n_eligible <= SMALL_EXACT_ELIGIBLE or math.comb(n_eligible, instance.k) <= (
        SMALL_EXACT_COHORTS
    )


def _solve_sqa(
    instance: CohortInstance,
    seed: int,
    *,
    reduce: bool = True,
    small_exact: bool = True,
    **schedule: Any,
) -> _Found:
    """Path-integral annealing with swap moves; tiny instances go to the exact solver."""
    return _solve_annealing(
        instance, seed, "sqa-swap", AnnealingSchedule(**schedule), reduce, small_exact
    )


def _solve_sa(
    instance: CohortInstance,
    seed: int,
    *,
    reduce: bool = True,
    small_exact: bool = True,
    **schedule: Any,
) -> _Found:
    """The same sampler without transverse field (one slice): classical annealing."""
    settings = {"chains": 16, "slices": 1, **schedule}
    return _solve_annealing(
        instance, seed, "sa-swap", AnnealingSchedule(**settings), reduce, small_exact
    )


def _solve_annealing(
    instance: CohortInstance,
    seed: int,
    name: str,
    schedule: AnnealingSchedule,
    reduce: bool,
    small_exact: bool,
) -> _Found:
    """Shared by both annealers: reduce, hand tiny instances to HiGHS, else anneal."""
    work = reduced_instance(instance) if reduce else instance
    details = {"candidates": int(work.eligible.sum())}
    if small_exact and _is_small(work):
        exact = _solve_exact(instance, seed, reduce=reduce)
        return _Found(exact.states, f"{name}/exact", {**details, "small_instance": True})
    states = anneal(work, schedule, seed=seed, reduce=False)
    replicas = {"chains": schedule.chains, "slices": schedule.slices}
    return _Found(states, name, {**details, **replicas})


def _solve_exact(
    instance: CohortInstance, seed: int, *, time_limit: float | None = None, reduce: bool = True
) -> _Found:
    """The MILP optimum (``seed`` is unused: the answer does not depend on it)."""
    del seed
    selected = solve_exact(instance, time_limit=time_limit, reduce=reduce)
    return _Found(_states(instance, [selected]), "exact", {"proven_optimal": True})


def _solve_greedy(instance: CohortInstance, seed: int) -> _Found:
    """Add the hospital with the best marginal gain until K are chosen."""
    del seed
    return _Found(repair(instance, np.zeros(instance.n, dtype=bool))[None], "greedy")


def _solve_random(instance: CohortInstance, seed: int) -> _Found:
    """A uniformly random eligible cohort: what plain federated averaging does.

    Its inclusion probabilities are those of the procedure, exactly ``K / n_eligible``, and its
    ensemble is the one cohort drawn (draw again by solving with another seed).
    """
    rng = np.random.default_rng(seed)
    eligible = instance.eligible_indices
    chosen = rng.choice(eligible, size=instance.k, replace=False)
    probabilities = np.where(instance.eligible, instance.k / eligible.size, 0.0)
    return _Found(_states(instance, [chosen]), "random", probabilities=probabilities)


def _dimod_backend(
    solver: str, module: str, name: str, defaults: dict[str, Any]
) -> Callable[..., _Found]:
    """A backend running a dimod sampler on the penalised BQM, repairing what it returns."""
    try:
        sampler_class = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise InstanceError(f"cannot load dimod sampler {module}.{name}: {error}") from None
    if not (isinstance(sampler_class, type) and issubclass(sampler_class, dimod.Sampler)):
        raise InstanceError(f"{module}.{name} is not a dimod Sampler class")

    def run(
        instance: CohortInstance, seed: int, *, penalty: float | None = None, **options: Any
    ) -> _Found:
        strength = sampling_penalty(instance) if penalty is None else penalty
        bqm = add_cardinality_penalty(instance_bqm(instance), instance.k, strength)
        sampler = sampler_class()
        settings = {**defaults, **options}
        if "seed" in sampler.parameters:
            settings.setdefault("seed", seed)
        sampleset = sampler.sample(bqm, **settings)
        raw = np.zeros((len(sampleset), instance.n), dtype=bool)
        raw[:, np.asarray(sampleset.variables, dtype=int)] = sampleset.record.sample.astype(bool)
        feasible = raw.sum(axis=1) == instance.k
        states = np.array(
            [
                state if ok else repair(instance, state)
                for state, ok in zip(raw, feasible, strict=True)
            ]
        )
        details = {"samples": len(raw), "repaired": int((~feasible).sum()), "penalty": strength}
        return _Found(states, solver, details)

    return run


def sampling_penalty(instance: CohortInstance) -> float:
    """Cardinality penalty for single-flip dimod samplers: half the median eligible utility.

    :func:`~fedllm.selection.qubo.penalty_strength` guarantees a feasible ground state but is
    so stiff that SA and path-integral samplers ended 13–54% below the optimum on our benchmark
    instances; half the median utility was the best of {safe, median, median/2} for all three
    samplers tried, and the few infeasible samples it lets through are repaired.
    """
    utility = float(np.median(instance.utility[instance.eligible]))
    return 0.5 * utility if utility > 0 else penalty_strength(instance)


def _states(instance: CohortInstance, cohorts: list[np.ndarray]) -> np.ndarray:
    """Index lists to a ``(len(cohorts), N)`` boolean matrix."""
    states = np.zeros((len(cohorts), instance.n), dtype=bool)
    for row, cohort in enumerate(cohorts):
        states[row, np.asarray(cohort, dtype=int)] = True
    return states


def _ensemble(
    instance: CohortInstance, found: _Found, temperature_share: float, max_samples: int
) -> SelectionResult:
    """Best cohort found, distinct low-energy cohorts and their Boltzmann inclusion probabilities.

    The ensemble is the distinct cohorts the solver found plus the best one-swap neighbours of
    its best cohort, so even a solver that returns one answer yields a spread that says how
    replaceable each member is. ``selected`` stays the solver's own best, so a neighbour never
    improves a baseline's reported answer. Weights are Boltzmann over *distinct* cohorts, not
    replica frequencies: how often replicas land on a cohort reflects chain count and basin
    size, not quality, and should not change a hospital's chance of being picked.
    """
    distinct = np.unique(found.states, axis=0)
    values = objectives(instance, distinct)
    best_state = distinct[int(np.argmax(values))]
    selected = tuple(int(i) for i in np.flatnonzero(best_state))
    objective = float(values.max())
    if found.probabilities is not None:
        pool, pool_values = best_state[None], np.array([objective])
    else:
        neighbours, neighbour_values = swap_neighbours(instance, best_state, max_samples)
        pool = np.concatenate([distinct, neighbours])
        pool_values = np.concatenate([values, neighbour_values])
        pool, first = np.unique(pool, axis=0, return_index=True)
        pool_values = pool_values[first]
    order = np.argsort(-pool_values, kind="stable")[:max_samples]
    pool, pool_values = pool[order], pool_values[order]
    temperature = temperature_share * float(np.abs(instance.utility[best_state]).sum())
    if temperature > 0:
        weights = np.exp((pool_values - pool_values[0]) / temperature)
    else:
        weights = (pool_values == pool_values[0]).astype(float)
    weights /= weights.sum()
    probabilities = found.probabilities
    if probabilities is None:
        probabilities = weights @ pool.astype(float)
    cohorts = [tuple(int(i) for i in np.flatnonzero(state)) for state in pool]
    return SelectionResult(
        selected=selected,
        objective=objective,
        solver=found.name,
        seconds=0.0,
        samples=[(cohort, float(v)) for cohort, v in zip(cohorts, pool_values, strict=True)],
        sample_weights=weights,
        inclusion_probabilities=probabilities,
        temperature=temperature,
        details=found.details,
    )
