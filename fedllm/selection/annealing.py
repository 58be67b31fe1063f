"""Path-integral (simulated quantum) annealing with cardinality-preserving swap moves.

The sampler never leaves the feasible set: every move swaps one chosen hospital ``i`` for one
unchosen eligible hospital ``j``, so ``Σx = K`` holds at every step and no penalty term is
needed. With ``g = λ S x − u`` (the energy cost of adding each hospital given the current
cohort) a swap changes the energy by ``ΔE = g_j − g_i − λ s_ij``, and an accepted swap updates
``g`` by ``λ (S_j − S_i)``: O(N) dense, O(degree) sparse.

Quantum part, stated plainly: the Suzuki–Trotter decomposition maps a transverse-field Ising
model onto ``P`` classical replicas ("slices") of the cohort coupled in a ring. Each slice sees
its own energy at inverse temperature ``β_t`` and a ferromagnetic coupling
``J_t = ½ ln coth(β_t Γ_t)`` to its neighbouring slices, so it is pulled towards the cohorts
the other slices hold; a large transverse field ``Γ`` means weak coupling. ``Γ_t`` and ``β_t``
follow geometric schedules. The default lowers ``Γ`` in step with the temperature
(``β_t Γ_t = 1``, a constant weak ``J ≈ 0.14``): the textbook schedule that ramps ``J`` up until
the slices lock into one cohort measured no better (docs/selection.md), because locked slices
give the final descent fewer distinct starting points. With ``slices=1`` the same code is
plain simulated annealing, the control that the measurements compare against.

Updates are heat-bath (Gibbs) block moves, vectorised over all replicas: for a random chosen
slot ``i`` the sampler draws its replacement among *all* unchosen hospitals (or keeps ``i``)
with probability ∝ ``exp(−β ΔE_ij − coupling change)``. Odd and even slices alternate so a
slice never moves together with a neighbour it is coupled to. The final replicas are polished
by steepest-descent swaps (:func:`swap_descent`), so every returned cohort is a local optimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fedllm.selection.instance import CohortInstance
from fedllm.selection.qubo import reduced_instance

DENSE_LIMIT = 3000
"""Candidate counts up to this use a dense similarity block (fast row gathers, ≤ 72 MB)."""


@dataclass(frozen=True)
class AnnealingSchedule:
    """Everything that shapes one annealing run; the defaults are the measured choice.

    Energies are in units of the mean candidate utility, so one schedule fits instances of
    any scale. A *sweep* gives every replica ``K`` heat-bath updates (one per cohort slot on
    average); ``max_work`` caps ``replicas × sweeps × K × n`` so that large instances get fewer
    sweeps rather than unbounded time. Chains start from independent random cohorts (starting
    all of them at the greedy cohort measured worse: they stay in its basin).
    """

    chains: int = 8
    slices: int = 2
    sweeps: float = 5.0
    beta_start: float = 10.0
    beta_end: float = 1000.0
    field_start: float = 0.1
    field_end: float = 0.001
    max_work: float = 2.5e7

    def __post_init__(self) -> None:
        if self.chains < 1 or self.slices < 1 or self.sweeps < 0:
            raise ValueError("chains and slices must be >= 1 and sweeps >= 0")
        if self.slices > 1 and self.slices % 2:
            raise ValueError("slices must be 1 (classical) or even (checkerboard updates)")

    def steps(self, n: int, k: int) -> int:
        """Vectorised update rounds for ``n`` candidates and cohort size ``k``."""
        replicas = self.chains * self.slices
        sweeps = min(self.sweeps, self.max_work / (replicas * k * n))
        rounds_per_update = 2 if self.slices > 1 else 1
        return int(np.ceil(sweeps * k)) * rounds_per_update


@dataclass
class _Problem:
    """The candidate sub-problem the sampler works on, re-indexed to ``0..n−1``."""

    candidates: np.ndarray
    utility: np.ndarray
    similarity: np.ndarray | sp.csr_array
    lam: float
    k: int

    @classmethod
    def of(cls, instance: CohortInstance, reduce: bool) -> _Problem:
        work = reduced_instance(instance) if reduce else instance
        candidates = work.eligible_indices
        block = work.similarity[candidates][:, candidates]
        if sp.issparse(block):
            block = block.toarray() if candidates.size <= DENSE_LIMIT else sp.csr_array(block)
        return cls(candidates, work.utility[candidates], block, work.lam, work.k)

    @property
    def n(self) -> int:
        return int(self.candidates.size)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Dense similarity rows ``S[index]`` as a ``(len(index), n)`` array."""
        if not sp.issparse(self.similarity):
            return self.similarity[index]
        indptr, columns, values = (
            self.similarity.indptr,
            self.similarity.indices,
            self.similarity.data,
        )
        starts, counts = indptr[index], indptr[index + 1] - indptr[index]
        offsets = np.repeat(starts - np.cumsum(counts) + counts, counts)
        flat = offsets + np.arange(counts.sum())
        out = np.zeros((index.size, self.n))
        out[np.repeat(np.arange(index.size), counts), columns[flat]] = values[flat]
        return out

    def costs(self, states: np.ndarray) -> np.ndarray:
        """``g = λ S x − u`` for each row of ``states``: the energy cost of adding each hospital."""
        fields = np.asarray((self.similarity @ states.T.astype(float)).T)
        return self.lam * fields - self.utility


def anneal(
    instance: CohortInstance,
    schedule: AnnealingSchedule | None = None,
    seed: int = 0,
    reduce: bool = True,
) -> np.ndarray:
    """Final cohorts of every replica after annealing and swap descent, as ``(R, N)`` bools.

    ``reduce`` restricts the search to hospitals that can be in an optimum
    (:func:`fedllm.selection.qubo.dominance_mask`); it never excludes an optimal cohort.
    """
    schedule = schedule or AnnealingSchedule()
    problem = _Problem.of(instance, reduce)
    rng = np.random.default_rng(seed)
    states = _initial_states(problem, schedule, rng)
    states = _run_schedule(problem, schedule, states, rng)
    states = _descend(problem, states)
    full = np.zeros((states.shape[0], instance.n), dtype=bool)
    full[:, problem.candidates] = states
    return full


def swap_descent(instance: CohortInstance, states: np.ndarray) -> np.ndarray:
    """Apply best-improvement swaps to each feasible cohort until none improves it."""
    problem = _Problem.of(instance, reduce=False)
    local = np.asarray(states, dtype=bool)[:, problem.candidates]
    full = np.zeros((local.shape[0], instance.n), dtype=bool)
    full[:, problem.candidates] = _descend(problem, local)
    return full


def _initial_states(
    problem: _Problem, schedule: AnnealingSchedule, rng: np.random.Generator
) -> np.ndarray:
    """One random cohort per chain, copied into each of its slices (all begin classical)."""
    keys = rng.random((schedule.chains, problem.n))
    chosen = np.argpartition(keys, problem.k - 1, axis=1)[:, : problem.k]
    starts = np.zeros((schedule.chains, problem.n), dtype=bool)
    np.put_along_axis(starts, chosen, True, axis=1)
    return np.repeat(starts, schedule.slices, axis=0)


def _run_schedule(
    problem: _Problem, schedule: AnnealingSchedule, states: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The heat-bath swap sweeps, slices alternating by parity when they are coupled."""
    n, k, slices = problem.n, problem.k, schedule.slices
    steps = schedule.steps(n, k)
    if n == k or steps == 0:
        return states
    replicas = states.shape[0]
    states = states.copy()
    inside = np.nonzero(states)[1].reshape(replicas, k)
    costs = problem.costs(states)
    scale = float(np.mean(np.abs(problem.utility))) or 1.0
    betas = np.geomspace(schedule.beta_start, schedule.beta_end, steps) / scale
    fields = np.geomspace(schedule.field_start, schedule.field_end, steps) * scale
    couplings = -0.5 * np.log(np.tanh(betas * fields))
    slice_of = np.arange(replicas) % slices
    above = np.arange(replicas) - slice_of + (slice_of + 1) % slices
    below = np.arange(replicas) - slice_of + (slice_of - 1) % slices
    groups = [np.flatnonzero(slice_of % 2 == parity) for parity in range(min(slices, 2))]
    for step in range(steps):
        rows = groups[step % len(groups)]
        local = np.arange(rows.size)
        slot = rng.integers(k, size=rows.size)
        leaving = inside[rows, slot]
        leaving_rows = problem.rows(leaving)
        row_costs = costs[rows]
        delta = row_costs - row_costs[local, leaving][:, None] - problem.lam * leaving_rows
        logits = -betas[step] * delta
        if slices > 1:
            neighbours = states[above[rows]].astype(float) + states[below[rows]]
            logits -= 4.0 * couplings[step] * (neighbours[local, leaving][:, None] - neighbours)
        logits[states[rows]] = -np.inf
        top = np.maximum(logits.max(axis=1), 0.0)
        cumulative = np.cumsum(np.exp(logits - top[:, None]), axis=1)
        stay = np.exp(-top)
        draw = rng.random(rows.size) * (cumulative[:, -1] + stay) - stay
        moves = draw > 0
        joining = np.minimum((cumulative[moves] < draw[moves, None]).sum(axis=1), n - 1)
        moved = rows[moves]
        states[moved, leaving[moves]] = False
        states[moved, joining] = True
        inside[moved, slot[moves]] = joining
        costs[moved] += problem.lam * (problem.rows(joining) - leaving_rows[moves])
    return states


def _descend(problem: _Problem, states: np.ndarray) -> np.ndarray:
    """Steepest-descent swaps on each distinct cohort (duplicates share the result)."""
    distinct, inverse = np.unique(states, axis=0, return_inverse=True)
    polished = np.array([_descend_one(problem, state) for state in distinct])
    return polished[inverse.ravel()]


def _descend_one(problem: _Problem, state: np.ndarray) -> np.ndarray:
    """Best-improvement swaps until no swap lowers the energy."""
    state = state.copy()
    costs = problem.costs(state[None])[0]
    while True:
        inside, outside = np.flatnonzero(state), np.flatnonzero(~state)
        if outside.size == 0:
            return state
        leaving, joining, delta = _best_swap(problem, costs, inside, outside)
        if delta >= -1e-12 * max(1.0, float(np.abs(costs).max())):
            return state
        state[leaving], state[joining] = False, True
        costs += (
            problem.lam * (problem.rows(np.array([joining])) - problem.rows(np.array([leaving])))[0]
        )


def _best_swap(
    problem: _Problem, costs: np.ndarray, inside: np.ndarray, outside: np.ndarray
) -> tuple[int, int, float]:
    """The swap with the lowest ``ΔE = g_j − g_i − λ s_ij``.

    Dense: the whole ``K × (n−K)`` table. Sparse: the separable part ``g_j − g_i`` is minimised
    by the worst member and best outsider, and only pairs with ``s_ij > 0`` can beat that, so
    the search costs O(n + K·degree) instead of O(K·n).
    """
    lam = problem.lam
    if not sp.issparse(problem.similarity):
        table = (
            costs[outside][None, :]
            - costs[inside][:, None]
            - lam * problem.similarity[np.ix_(inside, outside)]
        )
        a, b = np.unravel_index(np.argmin(table), table.shape)
        return int(inside[a]), int(outside[b]), float(table[a, b])
    worst = int(inside[np.argmax(costs[inside])])
    best = int(outside[np.argmin(costs[outside])])
    choice = (
        worst,
        best,
        float(costs[best] - costs[worst] - lam * problem.similarity[worst, best]),
    )
    pairs = sp.coo_array(problem.similarity[inside])
    is_out = np.zeros(problem.n, dtype=bool)
    is_out[outside] = True
    keep = is_out[pairs.col]
    if keep.any():
        rows, cols = inside[pairs.row[keep]], pairs.col[keep]
        deltas = costs[cols] - costs[rows] - lam * pairs.data[keep]
        at = int(np.argmin(deltas))
        if deltas[at] < choice[2]:
            choice = (int(rows[at]), int(cols[at]), float(deltas[at]))
    return choice
