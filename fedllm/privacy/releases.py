"""Gaussian releases of statistics a hospital shares with the server (selection, evaluation).

Every number that leaves a hospital and depends on its records is either a DP-SGD output or
goes through here: noise of standard deviation ``noise_multiplier × sensitivity`` drawn from a
:class:`~fedllm.privacy.randomness.RandomStream` seeded by the operating system (a seeded
generator would let anyone who knows the seed subtract the noise). The matching
:class:`~fedllm.privacy.events.GaussianRelease` is charged to the hospital's ledger before the
value is released.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedllm.privacy.randomness import RandomStream, fresh_stream


def release_scalar(
    value: float,
    sensitivity: float,
    noise_multiplier: float,
    stream: RandomStream | None = None,
) -> float:
    """``value`` plus N(0, (σ·Δ)²); ``stream`` defaults to a fresh OS-seeded one."""
    source = stream or fresh_stream()
    return float(value + source.normal_array(1, noise_multiplier * sensitivity)[0])


def release_counts(
    counts: Mapping[str, int], noise_multiplier: float, stream: RandomStream | None = None
) -> dict[str, float]:
    """A histogram with N(0, σ²) on every bin: adding or removing a unit changes one bin by 1.

    The L2 sensitivity is 1 under add/remove because each unit falls in exactly one bin, and
    √2 under replace-one (one bin down, another up), below the 2 that a replace-one accountant
    assumes for a sensitivity-1 Gaussian, so the charged event is an upper bound.
    """
    source = stream or fresh_stream()
    noise = source.normal_array(len(counts), noise_multiplier)
    return {key: float(count + n) for (key, count), n in zip(counts.items(), noise, strict=True)}
