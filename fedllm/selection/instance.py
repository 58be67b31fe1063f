"""A cohort-selection instance: the numbers one round's selection needs, validated once.

Every solver trusts a :class:`CohortInstance`, so all checking happens here, with messages a
hospital operator can act on, and the JSON file format lives next to the checks it feeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

Similarity = np.ndarray | sp.csr_array
"""Dense ``(N, N)`` array or CSR sparse array; sparse is what makes N = 10,000 affordable."""


class InstanceError(ValueError):
    """The instance (or a solver name) is unusable; the message says what to fix."""


@dataclass(frozen=True)
class CohortInstance:
    """Choose ``k`` eligible hospitals maximising ``Σ u_i − lam Σ_{i<j} s_ij`` over the cohort.

    ``eligible`` defaults to all hospitals and is a boolean array after construction.
    ``similarity`` is stored as given (dense ``ndarray`` or ``scipy.sparse.csr_array``) because
    densifying a 10,000-hospital matrix costs 800 MB for nothing.
    """

    utility: np.ndarray
    similarity: Similarity
    k: int
    lam: float
    eligible: np.ndarray | None = None

    def __post_init__(self) -> None:
        utility = np.asarray(self.utility, dtype=float)
        if utility.ndim != 1 or utility.size == 0:
            raise InstanceError("utility must be a non-empty 1-D list of numbers")
        n = utility.size
        similarity = _checked_similarity(self.similarity, n)
        eligible = np.ones(n, dtype=bool) if self.eligible is None else np.asarray(self.eligible)
        if eligible.shape != (n,):
            raise InstanceError(
                f"eligible has length {eligible.size}, expected {n} (one per hospital)"
            )
        if eligible.dtype != bool:
            raise InstanceError("eligible must contain only true/false values")
        if not np.all(np.isfinite(utility)):
            raise InstanceError("utility contains NaN or infinite values")
        lam = float(self.lam)
        if not math.isfinite(lam) or lam < 0:
            raise InstanceError(f"lambda must be a finite number >= 0, got {self.lam!r}")
        if isinstance(self.k, bool) or int(self.k) != self.k:
            raise InstanceError(f"k must be an integer, got {self.k!r}")
        k = int(self.k)
        n_eligible = int(eligible.sum())
        if k < 1:
            raise InstanceError(f"k must be at least 1, got {k}")
        if k > n_eligible:
            raise InstanceError(f"k = {k} but only {n_eligible} of {n} hospitals are eligible")
        object.__setattr__(self, "utility", utility)
        object.__setattr__(self, "similarity", similarity)
        object.__setattr__(self, "eligible", eligible)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "lam", lam)

    @property
    def n(self) -> int:
        """Number of hospitals, eligible or not."""
        return int(self.utility.size)

    @property
    def eligible_indices(self) -> np.ndarray:
        """Indices of hospitals that may be chosen, ascending."""
        return np.flatnonzero(self.eligible)


def _checked_similarity(similarity: Any, n: int) -> Similarity:
    """Return the similarity as float ndarray or CSR, or raise with the first problem found."""
    if sp.issparse(similarity):
        matrix = sp.csr_array(similarity, dtype=float)
        matrix.sum_duplicates()
        matrix.eliminate_zeros()
        values = matrix.data
    else:
        matrix = np.asarray(similarity, dtype=float)
        values = matrix
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise InstanceError(f"similarity must be a square N×N matrix, got shape {matrix.shape}")
    if matrix.shape[0] != n:
        raise InstanceError(
            f"similarity is {matrix.shape[0]}×{matrix.shape[0]} but utility has {n} entries"
        )
    if not np.all(np.isfinite(values)):
        raise InstanceError("similarity contains NaN or infinite values")
    if np.any(values < 0):
        raise InstanceError("similarity must be >= 0 (redundancy cannot be negative)")
    if np.any(matrix.diagonal() != 0):
        raise InstanceError("similarity must have a zero diagonal")
    asymmetry = abs(matrix - matrix.T)
    largest = asymmetry.max() if asymmetry.size else 0.0
    if largest > 1e-9 * max(1.0, float(np.max(values, initial=0.0))):
        raise InstanceError(f"similarity must be symmetric (largest |s_ij − s_ji| = {largest:g})")
    return matrix


def instance_from_dict(data: Any) -> CohortInstance:
    """Build an instance from the JSON document's parsed object.

    Format: ``{"k": K, "lambda": λ, "utility": [N], "similarity": [[N×N]], "eligible": [N]}``
    with ``eligible`` optional (default: all eligible).
    """
    if not isinstance(data, dict):
        raise InstanceError(
            "instance must be a JSON object with keys k, lambda, utility, similarity"
        )
    missing = [key for key in ("k", "lambda", "utility", "similarity") if key not in data]
    if missing:
        raise InstanceError(f"instance is missing required key(s): {', '.join(missing)}")
    unknown = sorted(set(data) - {"k", "lambda", "utility", "similarity", "eligible"})
    if unknown:
        raise InstanceError(f"instance has unknown key(s): {', '.join(unknown)}")
    try:
        utility = np.asarray(data["utility"], dtype=float)
        similarity = np.asarray(data["similarity"], dtype=float)
    except (TypeError, ValueError) as error:
        raise InstanceError(f"utility and similarity must be numbers: {error}") from None
    eligible = data.get("eligible")
    if eligible is not None:
        if not isinstance(eligible, list) or not all(isinstance(v, bool) for v in eligible):
            raise InstanceError("eligible must be a list of true/false values")
        eligible = np.asarray(eligible, dtype=bool)
    k, lam = data["k"], data["lambda"]
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise InstanceError(f"k must be an integer, got {k!r}")
    if isinstance(lam, bool) or not isinstance(lam, int | float):
        raise InstanceError(f"lambda must be a number, got {lam!r}")
    return CohortInstance(utility, similarity, k, lam, eligible)


def load_instance(path: Path) -> CohortInstance:
    """Read and validate an instance file; every failure is an :class:`InstanceError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InstanceError(f"cannot read instance file {path}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InstanceError(f"{path} is not valid JSON: {error}") from None
    return instance_from_dict(data)


def instance_to_dict(instance: CohortInstance) -> dict[str, Any]:
    """The JSON document for an instance (similarity written dense); inverse of loading."""
    similarity = instance.similarity
    dense = similarity.toarray() if sp.issparse(similarity) else similarity
    return {
        "k": instance.k,
        "lambda": instance.lam,
        "utility": instance.utility.tolist(),
        "similarity": dense.tolist(),
        "eligible": instance.eligible.tolist(),
    }


def synthetic_instance(
    n: int,
    k: int,
    seed: int = 0,
    *,
    neighbours: int | None = None,
    clusters: int = 8,
    balance: float = 1.0,
    spread: float = 0.6,
    tilt: float = 1.0,
    ineligible_share: float = 0.0,
) -> CohortInstance:
    """A reproducible instance shaped like real hospital cohorts, for tests and benchmarks.

    Each hospital has a feature vector drawn around one of ``clusters`` centres (case mix,
    region). Utility is lognormal: ``spread`` is its log-scale noise and ``tilt`` ties it to
    the features, so that the most useful hospitals are also similar to each other (the case
    that makes selection hard; with ``tilt=0`` greedy is nearly always optimal). Redundancy is
    the cosine similarity of features clipped at 0 — dense, or over the ``neighbours`` nearest
    only, as a sparse matrix. ``λ`` is set so the redundancy penalty is ``balance`` times the
    utility of a typical cohort, so that neither term dominates and the quadratic part matters.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, 16))
    features = centres[rng.integers(clusters, size=n)] + 0.8 * rng.normal(size=(n, 16))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    utility = np.exp(spread * rng.normal(size=n) + tilt * (features @ direction))
    if neighbours is None:
        similarity = np.clip(features @ features.T, 0.0, None)
        np.fill_diagonal(similarity, 0.0)
        pair_mean = similarity.sum() / (n * (n - 1))
        lam = 2.0 * balance * utility.mean() / ((k - 1) * pair_mean)
    else:
        similarity = _nearest_neighbour_similarity(features, neighbours)
        lam = balance * utility.mean() / similarity.data.mean()
    eligible = rng.random(n) >= ineligible_share
    eligible[np.argsort(rng.random(n))[:k]] = True
    return CohortInstance(utility, similarity, k, lam, eligible)


def _nearest_neighbour_similarity(features: np.ndarray, neighbours: int) -> sp.csr_array:
    """Symmetric sparse cosine similarity over each hospital's ``neighbours`` nearest peers."""
    n = features.shape[0]
    rows, cols, values = [], [], []
    for start in range(0, n, 1024):
        block = features[start : start + 1024] @ features.T
        block[np.arange(block.shape[0]), np.arange(start, start + block.shape[0])] = -np.inf
        nearest = np.argpartition(-block, neighbours, axis=1)[:, :neighbours]
        rows.append(np.repeat(np.arange(start, start + block.shape[0]), neighbours))
        cols.append(nearest.ravel())
        values.append(np.take_along_axis(block, nearest, axis=1).ravel())
    matrix = sp.csr_array(
        (np.clip(np.concatenate(values), 0.0, None), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, n),
    )
    symmetric = matrix.maximum(matrix.T).tocsr()
    symmetric.eliminate_zeros()
    return symmetric
