"""The cohort objective as a QUBO, plus the exact model-level facts every solver shares.

Maximising ``Σ u_i x_i − λ Σ_{i<j} s_ij x_i x_j`` is the same as minimising the energy
``E(x) = −Σ u_i x_i + λ Σ_{i<j} s_ij x_i x_j``; dimod samplers and the annealer both work
with ``E``, and everything reported to people is the objective ``−E``.
"""

from __future__ import annotations

from collections.abc import Iterable

import dimod
import numpy as np
import scipy.sparse as sp

from fedllm.selection.instance import CohortInstance, Similarity


def build_cohort_bqm(
    utility: np.ndarray,
    similarity: Similarity,
    k: int,
    lam: float,
    eligible: np.ndarray | None = None,
) -> dimod.BinaryQuadraticModel:
    """The unpenalised energy as a BINARY BQM: linear ``−u_i``, quadratic ``+λ s_ij``.

    Ineligible hospitals are *removed*, not fixed: with ``x_i = 0`` every term touching ``i``
    vanishes, so dropping the variable is exactly ``fix_variable(i, 0)`` without carrying dead
    variables into samplers. Variables keep their hospital index as label. ``k`` is validated
    here but not encoded: samplers that keep ``Σx = K`` use this model as is, the others get
    :func:`add_cardinality_penalty` on top.
    """
    instance = CohortInstance(utility, similarity, k, lam, eligible)
    return instance_bqm(instance)


def instance_bqm(instance: CohortInstance) -> dimod.BinaryQuadraticModel:
    """:func:`build_cohort_bqm` for an already validated instance."""
    labels = instance.eligible_indices
    rows, cols, values = redundant_pairs(instance.similarity, instance.eligible)
    position = np.full(instance.n, -1)
    position[labels] = np.arange(labels.size)
    bqm = dimod.BinaryQuadraticModel.from_numpy_vectors(
        -instance.utility[labels],
        (position[rows], position[cols], instance.lam * values),
        0.0,
        dimod.BINARY,
        variable_order=labels.tolist(),
    )
    return bqm


def add_cardinality_penalty(
    bqm: dimod.BinaryQuadraticModel, k: int, strength: float
) -> dimod.BinaryQuadraticModel:
    """Add ``strength · (Σ_v x_v − k)²`` in place (and return ``bqm`` for chaining).

    For samplers that flip single bits and so cannot keep the cohort size by construction.
    """
    bqm.add_linear_equality_constraint(
        [(v, 1.0) for v in bqm.variables], lagrange_multiplier=strength, constant=-float(k)
    )
    return bqm


def penalty_strength(instance: CohortInstance) -> float:
    """The smallest simple cardinality penalty under which every energy minimum is feasible.

    With ``A (Σx − K)²`` and ``|S| = K + d``, dropping the least useful member lowers the penalty
    by ``A(2d − 1) ≥ A`` and raises the energy by at most ``max u_i``; with ``|S| = K − d``,
    adding the best outsider costs at most ``min_j (λ·(j's K−1 largest similarities) − u_j)``.
    ``A`` just above both makes every infeasible state improvable towards feasibility, without
    the much larger penalties that flatten the landscape single-flip samplers see.
    """
    eligible = instance.eligible
    worst_addition = (
        instance.lam * _top_similarity_sums(instance, instance.k - 1) - instance.utility
    )
    bound = max(float(instance.utility[eligible].max()), float(worst_addition[eligible].min()), 0.0)
    return 1.01 * bound + 1e-9


def cohort_objective(
    utility: np.ndarray, similarity: Similarity, lam: float, selected: Iterable[int]
) -> float:
    """``Σ_{i∈S} u_i − λ Σ_{i<j∈S} s_ij``: the quantity to maximise, for one cohort."""
    index = np.asarray(sorted(set(int(i) for i in selected)), dtype=int)
    if index.size == 0:
        return 0.0
    block = similarity[index][:, index]
    pair_sum = block.sum() / 2.0
    return float(np.asarray(utility, dtype=float)[index].sum() - lam * pair_sum)


def objectives(instance: CohortInstance, states: np.ndarray) -> np.ndarray:
    """Objective of each row of a ``(R, N)`` 0/1 matrix, vectorised (one sparse product)."""
    x = np.asarray(states, dtype=float)
    fields = np.asarray((instance.similarity @ x.T).T)
    return x @ instance.utility - 0.5 * instance.lam * np.einsum("rn,rn->r", x, fields)


def similarity_rows(similarity: Similarity, rows: np.ndarray) -> np.ndarray:
    """Dense copy of the given rows, for dense and sparse similarity alike."""
    block = similarity[rows]
    return block.toarray() if sp.issparse(block) else np.array(block, dtype=float)


def repair(instance: CohortInstance, state: np.ndarray) -> np.ndarray:
    """Make any 0/1 vector a feasible cohort by greedy single-hospital moves.

    Ineligible hospitals are dropped first; then, while the cohort is too large, the member
    whose removal costs least leaves, and while it is too small, the hospital with the best
    marginal gain ``u_j − λ Σ_{l∈S} s_jl`` joins. From the empty set this *is* greedy.
    """
    x = np.asarray(state, dtype=bool) & instance.eligible
    fields = np.asarray(instance.similarity @ x.astype(float), dtype=float).ravel()
    while x.sum() > instance.k:
        contribution = np.where(x, instance.utility - instance.lam * fields, np.inf)
        leaving = int(np.argmin(contribution))
        x[leaving] = False
        fields -= similarity_rows(instance.similarity, np.array([leaving]))[0]
    while x.sum() < instance.k:
        gain = np.where(instance.eligible & ~x, instance.utility - instance.lam * fields, -np.inf)
        joining = int(np.argmax(gain))
        x[joining] = True
        fields += similarity_rows(instance.similarity, np.array([joining]))[0]
    return x


def dominance_mask(instance: CohortInstance) -> np.ndarray:
    """Eligible hospitals that can belong to an optimal cohort (a provably safe reduction).

    ``lb_i = u_i − λ·(sum of i's K−1 largest similarities to eligible hospitals)`` is the least
    hospital ``i`` can add to any cohort. If K hospitals have ``lb_i > u_j``, then in any cohort
    containing ``j`` one of them is outside and swapping it in for ``j`` strictly improves
    the objective, so ``j`` is in no optimum and is dropped. Exact solvers stay exact on the
    reduced instance; on sparse, high-N instances it removes most of the search space.
    """
    lower = instance.utility - instance.lam * _top_similarity_sums(instance, instance.k - 1)
    eligible = instance.eligible_indices
    threshold = np.partition(lower[eligible], eligible.size - instance.k)[
        eligible.size - instance.k
    ]
    return instance.eligible & (instance.utility >= threshold)


def reduced_instance(instance: CohortInstance) -> CohortInstance:
    """The same instance with dominated hospitals made ineligible (see :func:`dominance_mask`)."""
    return CohortInstance(
        instance.utility, instance.similarity, instance.k, instance.lam, dominance_mask(instance)
    )


def _top_similarity_sums(instance: CohortInstance, count: int) -> np.ndarray:
    """Per hospital, the sum of its ``count`` largest similarities to eligible hospitals."""
    if count <= 0:
        return np.zeros(instance.n)
    similarity = instance.similarity
    if not sp.issparse(similarity):
        masked = np.where(instance.eligible[None, :], similarity, 0.0)
        if count >= instance.n:
            return masked.sum(axis=1)
        return -np.partition(-masked, count - 1, axis=1)[:, :count].sum(axis=1)
    coo = sp.coo_array(similarity)
    keep = instance.eligible[coo.col]
    rows, values = coo.row[keep], coo.data[keep]
    order = np.lexsort((-values, rows))
    rows, values = rows[order], values[order]
    starts = np.searchsorted(rows, rows, side="left")
    rank = np.arange(rows.size) - starts
    top = rank < count
    return np.bincount(rows[top], weights=values[top], minlength=instance.n)


def redundant_pairs(
    similarity: Similarity, eligible: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, s_ij)`` for ``i < j``, both eligible, ``s_ij > 0``."""
    if sp.issparse(similarity):
        upper = sp.triu(similarity, k=1, format="coo")
        rows, cols, values = upper.row, upper.col, upper.data
    else:
        rows, cols = np.nonzero(np.triu(similarity, k=1))
        values = similarity[rows, cols]
    keep = eligible[rows] & eligible[cols] & (values > 0)
    return rows[keep], cols[keep], values[keep]


def swap_neighbours(
    instance: CohortInstance, cohort: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` best cohorts one swap away from ``cohort``, and their objectives.

    A swap of member ``i`` for outsider ``j`` changes the objective by
    ``(u_j − λ Σ_{l∈S} s_jl) − (u_i − λ Σ_{l∈S} s_il) + λ s_ij`` (``j`` no longer pays for
    ``i``); the whole ``K × (n−K)`` table costs one block of similarity rows, so this is cheap
    even at N = 10,000.
    """
    state = np.asarray(cohort, dtype=bool)
    inside = np.flatnonzero(state)
    outside = np.flatnonzero(instance.eligible & ~state)
    if outside.size == 0 or count <= 0:
        return np.zeros((0, instance.n), dtype=bool), np.zeros(0)
    gains = (
        instance.utility
        - instance.lam * np.asarray(instance.similarity @ state.astype(float), dtype=float).ravel()
    )
    pair = similarity_rows(instance.similarity, inside)[:, outside]
    change = gains[outside][None, :] - gains[inside][:, None] + instance.lam * pair
    flat = change.ravel()
    take = min(count, flat.size)
    best = np.argpartition(-flat, take - 1)[:take]
    best = best[np.argsort(-flat[best], kind="stable")]
    leaving, joining = np.unravel_index(best, change.shape)
    states = np.repeat(state[None], take, axis=0)
    states[np.arange(take), inside[leaving]] = False
    states[np.arange(take), outside[joining]] = True
    base = cohort_objective(instance.utility, instance.similarity, instance.lam, inside)
    return states, base + flat[best]
