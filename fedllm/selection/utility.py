"""Oort-style utility of a hospital and the redundancy between hospitals, from released statistics.

Everything here works on what hospitals *released* (noised loss statistics, noised specialty
counts) plus what the server observes itself (round durations, how often it picked whom), so
selection adds no privacy cost beyond the releases the hospitals' ledgers already paid for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def statistical_utility(num_units: int, square_loss_sum: float, sample_size: float) -> float:
    """Oort's |B|·sqrt(mean loss²), scaled to the whole hospital: n·sqrt(Σℓ²/|B|).

    The noised sum can be negative; it is floored at zero (post-processing, no privacy cost).
    """
    if sample_size <= 0:
        return 0.0
    return num_units * math.sqrt(max(square_loss_sum, 0.0) / sample_size)


def straggler_factor(duration_s: float | None, preferred_s: float, penalty: float) -> float:
    """Oort's system utility: (preferred / duration)^penalty for hospitals slower than preferred."""
    if duration_s is None or duration_s <= preferred_s or preferred_s <= 0:
        return 1.0
    return (preferred_s / duration_s) ** penalty


def exploration_bonus(server_round: int, times_selected: int, weight: float) -> float:
    """UCB-style bonus, so rarely selected hospitals get re-measured: w·sqrt(ln r / (1 + t))."""
    return weight * math.sqrt(math.log(max(server_round, 2)) / (1 + times_selected))


def profile_similarity(profiles: Sequence[Sequence[float] | None]) -> np.ndarray:
    """Cosine similarity of non-negative specialty profiles; zero diagonal, zero when unknown.

    Two hospitals with the same case mix teach the model much the same thing, so selecting
    both in one round is penalised by λ·s_ij in the cohort QUBO.
    """
    size = len(profiles)
    matrix = np.zeros((size, size))
    vectors = [
        None if p is None else np.clip(np.asarray(p, dtype=float), 0.0, None) for p in profiles
    ]
    norms = [None if v is None else float(np.linalg.norm(v)) for v in vectors]
    for i in range(size):
        for j in range(i + 1, size):
            if vectors[i] is None or vectors[j] is None or not norms[i] or not norms[j]:
                continue
            matrix[i, j] = matrix[j, i] = float(vectors[i] @ vectors[j]) / (norms[i] * norms[j])
    return matrix
