"""Find the least noise that keeps a planned DP-SGD run within an ε target.

Less noise means better models, so we want the smallest σ whose ε does not exceed the target,
computed by the same accountant that will later charge the ledger; otherwise a plan that fits
on paper could be refused by the ledger at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real

import dp_accounting

from fedllm.privacy.accountant import (
    HOSPITAL_NEIGHBOURING,
    PLD_VALUE_DISCRETIZATION_INTERVAL,
    check_accountant,
    check_delta,
    check_neighbouring,
    compute_epsilon,
    make_accountant,
)
from fedllm.privacy.events import (
    PrivacyEvent,
    SampledGaussianSteps,
    canonical_events,
    to_dp_event,
)

# Relative precision of σ: the returned σ is never more than 0.1 % noisier than necessary.
RELATIVE_TOLERANCE = 1e-3

# Below this σ, ε is in the hundreds for any useful run and numerical accounting gets slow, so
# targets needing less noise are refused rather than searched for. A target still missed at the
# maximum is below the accountant's numerical resolution (RDP bottoms out near ε = 0.004).
MIN_NOISE_MULTIPLIER = 0.1
MAX_NOISE_MULTIPLIER = 1e6

# The first search starts at a typical DP-SGD σ of 1 and steps by 1.5. For "pld" it uses a PLD
# ten times coarser (~10x faster, still pessimistic), which lands a fraction of a percent above
# the final σ, so the search at full resolution usually needs only two evaluations.
_FIRST_START = 1.0
_FIRST_STEP = 1.5
_SEARCH_PLD_INTERVAL = 10 * PLD_VALUE_DISCRETIZATION_INTERVAL


def _bracket(gap: Callable[[float], float], start: float, step: float) -> tuple[float, float]:
    """Return (low, high) with gap(low) > 0 >= gap(high), galloping outward from `start`.

    The step factor squares after each miss, so a good `start` costs two evaluations and a poor
    one only logarithmically many. dp_accounting's own bracket search starts at σ = 0, where ε
    is infinite and a PLD unbounded, hence this search.
    """
    low = high = start
    if gap(start) > 0:
        while True:
            if high >= MAX_NOISE_MULTIPLIER:
                raise ValueError("target epsilon is below what the accountant can resolve")
            low, high, step = high, min(high * step, MAX_NOISE_MULTIPLIER), step * step
            if gap(high) <= 0:
                return low, high
    while True:
        if low <= MIN_NOISE_MULTIPLIER:
            raise ValueError(
                "target epsilon is so large it would need a noise multiplier below "
                f"{MIN_NOISE_MULTIPLIER}"
            )
        low, high, step = max(low / step, MIN_NOISE_MULTIPLIER), low, step * step
        if gap(low) > 0:
            return low, high


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    fixed_events: Sequence[PrivacyEvent] = (),
    neighbouring: str = HOSPITAL_NEIGHBOURING,
) -> float:
    """Return the smallest σ (to 0.1 %) with ε([SampledGaussianSteps(σ, q, steps)], δ) <= target.

    ``fixed_events`` are other releases the same budget must also pay for (noised utility
    statistics, a data profile); σ is chosen so that the DP-SGD steps composed with them still
    meet the target. The result is guaranteed to satisfy the target under `accountant`.
    """
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, Real)
        or not math.isfinite(target_epsilon)
        or target_epsilon <= 0
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    check_delta(delta)
    check_accountant(accountant)
    check_neighbouring(accountant, neighbouring)
    SampledGaussianSteps(1.0, sample_rate, steps)  # validates q and steps before any search

    def solve(pld_interval: float, start: float, step: float) -> float:
        def gap(sigma: float) -> float:
            event = SampledGaussianSteps(sigma, sample_rate, steps)
            epsilon = compute_epsilon(
                [event, *fixed_events],
                delta,
                accountant,
                pld_interval=pld_interval,
                neighbouring=neighbouring,
            )
            return epsilon - target_epsilon

        low, high = _bracket(gap, start, step)
        if high - low <= RELATIVE_TOLERANCE * high:
            return high
        return dp_accounting.calibrate_dp_mechanism(
            make_fresh_accountant=lambda: make_accountant(
                accountant, pld_interval=pld_interval, neighbouring=neighbouring
            ),
            make_event_from_param=lambda sigma: to_dp_event(
                canonical_events([SampledGaussianSteps(sigma, sample_rate, steps), *fixed_events])
            ),
            target_epsilon=target_epsilon,
            target_delta=delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(low, high),
            tol=RELATIVE_TOLERANCE * low,
        )

    sigma = solve(_SEARCH_PLD_INTERVAL, start=_FIRST_START, step=_FIRST_STEP)
    if accountant == "pld":
        # Half a tolerance step: if it already breaks the target, σ is final after two evaluations.
        sigma = solve(
            PLD_VALUE_DISCRETIZATION_INTERVAL, start=sigma, step=1 + RELATIVE_TOLERANCE / 2
        )
    return sigma
