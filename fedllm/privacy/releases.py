"""Gaussian releases of statistics a hospital shares with the server for cohort selection.

Every number that leaves a hospital and depends on its records is either a DP-SGD output or
goes through here: noise of standard deviation ``noise_multiplier × sensitivity``, drawn from
the operating system's entropy (a seeded generator would let anyone who knows the seed
subtract the noise). The matching :class:`~fedllm.privacy.events.GaussianRelease` is charged
to the hospital's ledger before the value is released.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

_RNG = np.random.default_rng()


def release_scalar(value: float, sensitivity: float, noise_multiplier: float) -> float:
    """``value`` plus N(0, (σ·Δ)²)."""
    return float(value + _RNG.normal(0.0, noise_multiplier * sensitivity))


def release_counts(counts: Mapping[str, int], noise_multiplier: float) -> dict[str, float]:
    """A histogram with N(0, σ²) on every bin: adding or removing a record changes one bin by 1.

    The L2 sensitivity is 1 because each record falls in exactly one bin.
    """
    noise = _RNG.normal(0.0, noise_multiplier, size=len(counts))
    return {key: float(count + n) for (key, count), n in zip(counts.items(), noise, strict=True)}
