"""Derive ε from privacy events with a tight numerical accountant.

Every reported ε comes from here. "pld" (dp_accounting's privacy loss distributions) is the
default; "prv" (opacus' privacy loss random variables) is an independent tight accountant;
"rdp" (Rényi DP) is looser but cheap. None uses a Gaussian/CLT approximation.

The neighbouring relation must match what is released. fedllm's hospitals publish their
dataset sizes (the sampling rate q = B/n, the aggregation weight n), and a known size tells
add/remove neighbours apart, so every hospital's ε is accounted for **replace-one**
(substitution of one unit by any other), which only the PLD accountant supports for
Poisson-sampled Gaussians. Under replace-one, dp_accounting treats a Gaussian with noise
multiplier σ as having sensitivity 2 in units of the add/remove sensitivity (one unit's
contribution leaves, another's enters), which is exact for DP-SGD's clipped gradient sums
and an upper bound for bounded scalars and histograms. ``add-remove`` stays available for
mechanisms whose events already encode their own replacement sensitivity (consensus votes) and
for comparisons.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from numbers import Real

import dp_accounting
import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant, privacy_loss_distribution
from dp_accounting.rdp import RdpAccountant

from fedllm.privacy.events import (
    PrivacyEvent,
    SampledGaussianSteps,
    canonical_events,
    to_dp_event,
)

ACCOUNTANTS = ("pld", "rdp", "prv")
NEIGHBOURING_RELATIONS = ("replace-one", "add-remove")
# The relation of every hospital's ledger, plan and report (see the module docstring).
HOSPITAL_NEIGHBOURING = "replace-one"

_RELATIONS = {
    "replace-one": dp_accounting.NeighboringRelation.REPLACE_ONE,
    "add-remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
}

# PLD discretisation of the privacy loss. The loss is rounded up (pessimistic), so ε is always
# an upper bound and the interval only trades tightness for time. dp_accounting's own default,
# 1e-4, stays within 0.05 % of a 3e-5 reference even for 1e5 steps at q = 0.001, where 1e-3
# overstates ε by 5 %; it costs about a second at most per evaluation for DP-SGD ledgers.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4

# The most points a discretised privacy-loss distribution may span before ``fedllm privacy
# epsilon`` refuses to compute it. Measured on 2 cores: ~1e7 points took ~6 s and 0.8 GB
# (σ = 0.5, q = 0.5, 1000 steps), ~6e7 points 40 s and 3.9 GB, ~1e10 points ran out of memory.
MAX_LOSS_GRID_POINTS = 1e7
# dp_accounting drops log-mass -50 of each Gaussian's tails (±10 σ) and keeps 1 - 1e-15 of the
# composed distribution; the estimate below spans the same ranges.
_GAUSSIAN_TAIL_SIGMAS = 10.0
_COMPOSED_TAIL_MASS = 1e-15
_ESTIMATE_GRID = 20_001

# Composing is the expensive part; reading ε at some δ from a composed accountant is cheap. A
# few composed accountants are kept so that repeated queries on the same ledger (spent, then
# projected, at one or several δ) compose once. Each PLD can hold ~1e6 floats, hence so few.
_CACHE_SIZE = 8
# One step of Poisson-sampled Gaussian noise as a PLD depends on σ, q, the interval and the
# relation alone; a ledger's every new charge needs the same few (one per DP-SGD schedule).
_STEP_CACHE_SIZE = 16


@functools.lru_cache(maxsize=_STEP_CACHE_SIZE)
def _sampled_gaussian_step(
    noise_multiplier: float,
    sampling_prob: float,
    interval: float,
    relation: dp_accounting.NeighboringRelation,
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """The PLD of one Poisson-sampled Gaussian step, exactly as PLDAccountant builds it."""
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=interval,
        sampling_prob=sampling_prob,
        neighboring_relation=relation,
    )


class StepCachingPLDAccountant(PLDAccountant):
    """dp_accounting's PLD accountant, reusing the PLD of one DP-SGD step across ledgers' ε.

    Building a Poisson-sampled Gaussian step's PLD is most of a ledger's ε computation (about
    a second on 2 cores), and every charge of a hospital's ledger composes a new total number
    of the same steps. This accountant takes that step's PLD from a cache and does everything
    else as :class:`PLDAccountant` does (the same ``self_compose(count)`` and ``compose``, in the
    same order), so its ε equals a fresh PLDAccountant's exactly (tests compare them); the
    library's PLDs are never changed in place, so sharing one is safe.
    """

    def _maybe_compose(self, event: dp_event.DpEvent, count: int, do_compose: bool):
        sampled_gaussian = (
            isinstance(event, dp_event.PoissonSampledDpEvent)
            and isinstance(event.event, dp_event.GaussianDpEvent)
            and event.sampling_probability != 0
            and event.event.noise_multiplier != 0
        )
        if not sampled_gaussian:
            return super()._maybe_compose(event, count, do_compose)
        if do_compose:
            step = _sampled_gaussian_step(
                float(event.event.noise_multiplier),
                float(event.sampling_probability),
                self._value_discretization_interval,
                self.neighboring_relation,
            )
            self._pld = self._pld.compose(step.self_compose(count))
        return None


class PrvAccountant(dp_accounting.PrivacyAccountant):
    """dp_accounting interface over opacus' PRV accountant.

    Wrapping opacus in dp_accounting's PrivacyAccountant lets PRV consume the same DpEvents as
    PLD and RDP, so compute_epsilon and noise calibration treat all accountants uniformly.
    Supported events are Gaussians, optionally Poisson-sampled, under (self-)composition.
    """

    def __init__(self) -> None:
        super().__init__(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        self._history: list[tuple[float, float, int]] = []

    def _maybe_compose(
        self, event: dp_event.DpEvent, count: int, do_compose: bool
    ) -> dp_accounting.PrivacyAccountant.CompositionErrorDetails | None:
        """Flatten the event tree into opacus' (σ, q, steps) history."""
        if isinstance(event, dp_event.NoOpDpEvent):
            return None
        if isinstance(event, dp_event.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, dp_event.ComposedDpEvent):
            for sub in event.events:
                error = self._maybe_compose(sub, count, do_compose)
                if error is not None:
                    return error
            return None
        sampled = isinstance(event, dp_event.PoissonSampledDpEvent)
        mechanism = event.event if sampled else event
        if not isinstance(mechanism, dp_event.GaussianDpEvent):
            return self.CompositionErrorDetails(
                invalid_event=event,
                error_message="PRV supports only (Poisson-sampled) Gaussian events",
            )
        if do_compose and count > 0:
            q = event.sampling_probability if sampled else 1.0
            self._history.append((mechanism.noise_multiplier, q, count))
        return None

    def get_epsilon(self, target_delta: float) -> float:
        """Return opacus' PRV upper bound on ε (its default ε error of 0.01)."""
        if not self._history:
            return 0.0
        # opacus imports torch (~2 s); pay that only when PRV is actually requested.
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = list(self._history)
        # opacus evaluates log(1 - q) at q = 1 and overflows exp() when ε is huge; those yield
        # inf, which callers see as "no bound", so numpy's warnings are noise here.
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return float(prv.get_epsilon(delta=target_delta))


def check_accountant(name: str) -> None:
    """Raise ValueError naming the valid accountants if `name` is not one of them."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; expected one of {', '.join(ACCOUNTANTS)}")


def check_delta(delta: float) -> None:
    """Raise ValueError unless 0 < δ < 1 (δ = 0 makes Gaussian ε infinite, δ >= 1 is vacuous)."""
    if isinstance(delta, bool) or not isinstance(delta, Real) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def check_neighbouring(accountant: str, neighbouring: str) -> None:
    """Raise ValueError for an unknown relation, or one the accountant cannot bound."""
    if neighbouring not in NEIGHBOURING_RELATIONS:
        raise ValueError(
            f"unknown neighbouring relation {neighbouring!r}; expected one of "
            f"{', '.join(NEIGHBOURING_RELATIONS)}"
        )
    if neighbouring == "replace-one" and accountant != "pld":
        raise ValueError(
            f"the {accountant} accountant bounds add/remove-one only; replace-one (the relation "
            "that holds when dataset sizes are public, as they are in fedllm) needs 'pld'"
        )


def make_accountant(
    name: str,
    *,
    pld_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
    neighbouring: str = HOSPITAL_NEIGHBOURING,
) -> dp_accounting.PrivacyAccountant:
    """Return a fresh, empty accountant of the named kind, configured as compute_epsilon uses it.

    `pld_interval` only affects "pld"; see compute_epsilon.
    """
    check_accountant(name)
    check_neighbouring(name, neighbouring)
    if not pld_interval > 0:
        raise ValueError(f"pld_interval must be > 0, got {pld_interval!r}")
    if name == "pld":
        return StepCachingPLDAccountant(
            _RELATIONS[neighbouring], value_discretization_interval=pld_interval
        )
    if name == "rdp":
        return RdpAccountant()
    return PrvAccountant()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _composed(
    events: tuple[PrivacyEvent, ...], name: str, pld_interval: float, neighbouring: str
) -> dp_accounting.PrivacyAccountant:
    """Compose canonical events once; callers only query ε, never compose into the result."""
    accountant = make_accountant(name, pld_interval=pld_interval, neighbouring=neighbouring)
    return accountant.compose(to_dp_event(events))


def compute_epsilon(
    events: Sequence[PrivacyEvent],
    delta: float,
    accountant: str = "pld",
    *,
    pld_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
    neighbouring: str = HOSPITAL_NEIGHBOURING,
) -> float:
    """Return the ε at `delta` of composing all `events` (0.0 for no events).

    `neighbouring` defaults to the relation of hospital ledgers (replace-one).

    A coarser `pld_interval` still gives a valid, slightly looser upper bound at proportionally
    lower cost; calibration uses one to get close before confirming at the default. Reported ε
    must use the default.
    """
    check_accountant(accountant)
    check_neighbouring(accountant, neighbouring)
    check_delta(delta)
    canonical = canonical_events(events)
    if not canonical:
        return 0.0
    return _epsilon(canonical, float(delta), accountant, pld_interval, neighbouring)


@functools.lru_cache(maxsize=4 * _CACHE_SIZE)
def _epsilon(
    events: tuple[PrivacyEvent, ...],
    delta: float,
    name: str,
    pld_interval: float,
    neighbouring: str,
) -> float:
    """ε of canonical events at ``delta``, read once: a ledger asks for the same ε repeatedly
    (spent after a charge, in a status, in an evaluation) and each reading searches the PLD."""
    composed = _composed(events, name, pld_interval, neighbouring)
    epsilon = float(composed.get_epsilon(delta))
    if math.isnan(epsilon):
        raise ArithmeticError(f"{name} accountant returned NaN for {events}")
    return epsilon


def loss_grid_points(
    event: SampledGaussianSteps,
    neighbouring: str = HOSPITAL_NEIGHBOURING,
    pld_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    """Estimate how many points a discretised privacy loss of `event` spans, before building it.

    A numerical accountant's time and memory grow with the width of the privacy-loss
    distribution it discretises, and a tiny σ makes that width explode (σ = 0.01 at q = 0.5
    over 1000 steps ran for minutes and gigabytes before being killed). The width is one step's
    loss range plus the spread of the composed loss, taken as a Gaussian tail bound over the
    per-step loss variance (computed here on a fine grid of the noise). It predicts the measured
    cost within a small factor; it is a guard, not part of any reported ε.
    """
    sigma, q = float(event.noise_multiplier), float(event.sample_rate)
    reach = 1.0 + _GAUSSIAN_TAIL_SIGMAS * sigma
    x = np.linspace(-reach, reach, _ESTIMATE_GRID)

    def log_mixture(shift: float) -> np.ndarray:
        """log((1 - q)·N(0, σ²) + q·N(shift, σ²)), without the shared normalising constant."""
        moved = math.log(q) - (x - shift) ** 2 / (2 * sigma**2)
        if q == 1:
            return moved
        return np.logaddexp(math.log1p(-q) - x**2 / (2 * sigma**2), moved)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        present = log_mixture(1.0)
        # replace-one: the unit's contribution moves from +1 to -1; add-remove: it vanishes
        replaced = neighbouring == "replace-one"
        absent = log_mixture(-1.0) if replaced else -(x**2) / (2 * sigma**2)
        loss = present - absent
        weights = np.exp(present - present.max())
        weights /= weights.sum()
        mean = float(weights @ loss)
        variance = float(weights @ (loss - mean) ** 2)
        one_step = float(loss.max() - loss.min())
    spread = 2 * math.sqrt(2 * math.log(1 / _COMPOSED_TAIL_MASS) * event.steps * variance)
    points = (one_step + spread) / pld_interval
    return points if math.isfinite(points) else math.inf


def check_loss_grid(event: SampledGaussianSteps, accountant: str, neighbouring: str) -> None:
    """Refuse, before computing anything, an ε whose numerical accountant would not finish.

    RDP is closed-form and always cheap; PLD and PRV discretise the privacy loss.
    """
    if accountant == "rdp":
        return
    points = loss_grid_points(event, neighbouring)
    if points > MAX_LOSS_GRID_POINTS:
        raise ValueError(
            f"noise_multiplier {event.noise_multiplier:g} at sample_rate {event.sample_rate:g} "
            f"over {event.steps} steps spreads the privacy loss over ~{points:.2g} grid points "
            f"(the {accountant} accountant computes up to {MAX_LOSS_GRID_POINTS:.0g}, about "
            "10 s and 1 GB); ε would be in the thousands or more: add noise or take fewer steps"
        )


def least_tractable_noise(
    sample_rate: float, steps: int, neighbouring: str, floor: float, ceiling: float = 1e3
) -> float:
    """The smallest σ in [floor, ceiling] (within 5 %) whose loss grid fits the limit.

    Noise calibration searches downward, so a target that only a smaller σ meets would run
    away the way a direct ε query would; callers compare the target with ε at this σ. The
    grid shrinks as σ grows; ``inf`` means even the ceiling is too little noise.
    """

    def fits(sigma: float) -> bool:
        event = SampledGaussianSteps(sigma, sample_rate, steps)
        return loss_grid_points(event, neighbouring) <= MAX_LOSS_GRID_POINTS

    if fits(floor):
        return floor
    if not fits(ceiling):
        return math.inf
    low, high = floor, ceiling
    while high / low > 1.05:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high
