"""Aggregation rules: pure functions from hospitals' adapter state dicts to one state dict.

Every rule validates that all updates share keys, shapes and a floating dtype before touching
numbers, because a silently broadcast or reordered tensor would corrupt the global adapter
without any error. Arithmetic runs in float64 and results are cast back to each tensor's dtype,
so averaging many float32 or bfloat16 updates does not accumulate rounding error.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import structlog
import torch

log = structlog.get_logger(__name__)

AdapterState = Mapping[str, torch.Tensor]


def check_compatible(updates: Sequence[AdapterState]) -> list[str]:
    """Return the common key order of `updates`, or raise ValueError naming the first mismatch.

    Shared by every rule (and server-side DP) so that all of them refuse the same inputs.
    """
    if len(updates) == 0:
        raise ValueError("need at least one update to aggregate")
    first = updates[0]
    keys = list(first)
    for index, update in enumerate(updates[1:], start=1):
        if set(update) != set(keys):
            missing = sorted(set(keys) - set(update))
            extra = sorted(set(update) - set(keys))
            raise ValueError(
                f"update {index} has different keys from update 0 "
                f"(missing: {missing[:3]}, unexpected: {extra[:3]})"
            )
        for key in keys:
            if update[key].shape != first[key].shape:
                raise ValueError(
                    f"update {index} has shape {tuple(update[key].shape)} for {key!r}, "
                    f"update 0 has {tuple(first[key].shape)}"
                )
    for key in keys:
        if not first[key].is_floating_point():
            raise ValueError(f"{key!r} has non-floating dtype {first[key].dtype}")
    return keys


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    """A detached float64 CPU copy: the precision every rule computes in."""
    return tensor.detach().cpu().to(torch.float64)


def _check_weights(name: str, weights: Sequence[float], count: int) -> list[float]:
    """Return weights as floats, rejecting wrong lengths, negatives, NaN and infinities."""
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"{name}: got {len(values)} values for {count} updates")
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"{name} must be finite and >= 0, got {bad[0]!r}")
    return values


def _check_probabilities(probabilities: Sequence[float], count: int) -> list[float]:
    """Return inclusion probabilities as floats, each required to lie in (0, 1]."""
    values = [float(p) for p in probabilities]
    if len(values) != count:
        raise ValueError(f"inclusion_probabilities: got {len(values)} values for {count} updates")
    bad = [p for p in values if not 0 < p <= 1]
    if bad:
        raise ValueError(
            f"inclusion probabilities must be in (0, 1], got {bad[0]!r}; a selected hospital "
            "cannot have probability 0 of being selected"
        )
    return values


def _linear_combination(
    updates: Sequence[AdapterState], coefficients: Sequence[float], keys: Sequence[str]
) -> OrderedDict[str, torch.Tensor]:
    """Σ_i c_i u_i per key, in float64, cast back to each key's dtype."""
    result: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key in keys:
        total = torch.zeros(updates[0][key].shape, dtype=torch.float64)
        for update, coefficient in zip(updates, coefficients, strict=True):
            total += coefficient * _f64(update[key])
        result[key] = total.to(updates[0][key].dtype)
    return result


def weighted_mean(
    updates: Sequence[AdapterState], weights: Sequence[float]
) -> OrderedDict[str, torch.Tensor]:
    """Σ_i w_i u_i / Σ_i w_i, per key: FedAvg when w_i are example counts.

    Weights are normalised here so callers may pass raw counts or unnormalised inclusion
    weights. Raises ValueError on incompatible updates, negative or non-finite weights, or
    weights that are all zero (the mean would be undefined).
    """
    keys = check_compatible(updates)
    values = _check_weights("weights", weights, len(updates))
    total = math.fsum(values)
    if total <= 0:
        raise ValueError("weights are all zero; the weighted mean is undefined")
    return _linear_combination(updates, [w / total for w in values], keys)


def inclusion_weights(
    num_examples: Sequence[float], inclusion_probabilities: Sequence[float]
) -> list[float]:
    """Normalised weights w_i ∝ n_i / π_i for the self-normalised (ratio) estimator.

    Why divide by π_i: when the cohort S is drawn with P(i ∈ S) = π_i, a hospital that is
    rarely selected stands in, each time it is, for the rounds it is absent. Writing 1_i for
    the indicator of i ∈ S, E[1_i] = π_i, so

        E[Σ_{i∈S} (n_i/π_i) u_i] = Σ_j π_j (n_j/π_j) u_j = Σ_j n_j u_j,

    and the Horvitz–Thompson estimator Σ_{i∈S} (n_i/π_i) u_i / Σ_j n_j is exactly unbiased for
    the full-participation mean Σ_j n_j u_j / Σ_j n_j. Without the 1/π_i factor, hospitals the
    selector favours are over-represented and the aggregate drifts toward their data.

    These weights feed `weighted_mean`, which divides by Σ_{i∈S} n_i/π_i (a random estimate
    of Σ_j n_j) instead of the known total: a ratio estimator. It is slightly biased (the
    ratio of unbiased estimates is not unbiased; the bias is O(1/K) for cohort size K) but
    consistent, its weights always sum to one, and its variance is usually much lower because
    the numerator and the denominator fluctuate together. Unlike Horvitz–Thompson (whose
    coefficients do not sum to one), it applies to absolute adapter weights as well as deltas;
    tests/test_aggregation.py compares the two.
    """
    counts = _check_weights("num_examples", num_examples, len(num_examples))
    probabilities = _check_probabilities(inclusion_probabilities, len(counts))
    raw = [n / p for n, p in zip(counts, probabilities, strict=True)]
    total = math.fsum(raw)
    if total <= 0:
        raise ValueError("num_examples are all zero; inclusion weights are undefined")
    return [w / total for w in raw]


def _coordinatewise(
    updates: Sequence[AdapterState], reduce: Callable[[torch.Tensor], torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Apply `reduce` to each key's updates sorted along a new leading axis."""
    keys = check_compatible(updates)
    result: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key in keys:
        stacked = torch.stack([_f64(u[key]) for u in updates])
        result[key] = reduce(torch.sort(stacked, dim=0).values).to(updates[0][key].dtype)
    return result


def trimmed_mean(
    updates: Sequence[AdapterState], trim_fraction: float
) -> OrderedDict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the floor(trim_fraction · n) extremes at each end.

    Robust to up to that many arbitrary (faulty or adversarial) hospitals per coordinate, at
    the price of ignoring example counts and inclusion probabilities: every kept update counts
    equally. With few updates the floor is 0 (the default 0.2 trims nothing below n = 5) and
    the rule silently becomes an unweighted mean, so that case is logged as a warning.
    """
    fraction = float(trim_fraction)
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    cut = math.floor(fraction * len(updates))
    if cut == 0 and fraction > 0:
        log.warning(
            "aggregation.trimmed_mean_trims_nothing",
            updates=len(updates),
            trim_fraction=fraction,
            reason=(
                f"floor({fraction:g} x {len(updates)}) = 0: this is an unweighted mean; "
                + (
                    f"trim_fraction >= {1 / len(updates):.3g} trims one update at each end"
                    if len(updates) >= 3
                    else "no trim_fraction below 0.5 trims fewer than 3 updates"
                )
            ),
        )
    return _coordinatewise(updates, lambda s: s[cut : s.shape[0] - cut].mean(dim=0))


def coordinate_median(updates: Sequence[AdapterState]) -> OrderedDict[str, torch.Tensor]:
    """Coordinate-wise median (mean of the two middle values when n is even, as numpy).

    torch.median returns the lower middle value for even n, which biases the result toward
    smaller values, so the median is taken from the sorted stack instead.
    """

    def middle(ordered: torch.Tensor) -> torch.Tensor:
        n = ordered.shape[0]
        return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2

    return _coordinatewise(updates, middle)


def update_delta(new: AdapterState, reference: AdapterState) -> OrderedDict[str, torch.Tensor]:
    """new − reference per key: the update a hospital made to the global adapter."""
    keys = check_compatible([reference, new])
    return OrderedDict(
        (key, (_f64(new[key]) - _f64(reference[key])).to(reference[key].dtype)) for key in keys
    )


def apply_delta(reference: AdapterState, delta: AdapterState) -> OrderedDict[str, torch.Tensor]:
    """reference + delta per key, in the reference's key order and dtypes."""
    keys = check_compatible([reference, delta])
    return OrderedDict(
        (key, (_f64(reference[key]) + _f64(delta[key])).to(reference[key].dtype)) for key in keys
    )
