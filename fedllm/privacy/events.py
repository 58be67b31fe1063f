"""Privacy events: the data a ledger stores, from which every ε is derived.

A hospital's privacy loss is recorded as the mechanisms it ran on its records, never as an ε.
Storing mechanisms keeps the ledger exact under composition and lets any accountant (today's or
a tighter future one) re-derive ε from the same history. The events mirror dp_accounting's DpEvent
algebra so that translation to an accountant is mechanical.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ClassVar

import dp_accounting


def _check_positive_real(name: str, value: object) -> None:
    """Reject non-numbers, NaN, infinities and non-positive values for a noise multiplier."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_count(name: str, value: object) -> None:
    """Reject counts that are not integers >= 1 (bools are ints in Python, but never counts)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


@dataclass(frozen=True)
class SampledGaussianSteps:
    """`steps` DP-SGD steps, each Poisson-sampling records at rate q and adding Gaussian noise.

    The noise multiplier σ is the noise standard deviation divided by the per-example clipping
    norm, so one record's contribution has sensitivity 1 in these units.
    """

    kind: ClassVar[str] = "sampled_gaussian_steps"

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        """Validate eagerly so an invalid mechanism can never reach a ledger."""
        _check_positive_real("noise_multiplier", self.noise_multiplier)
        q = self.sample_rate
        if isinstance(q, bool) or not isinstance(q, Real) or not math.isfinite(q):
            raise ValueError(f"sample_rate must be a finite number, got {q!r}")
        if not 0 < q <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")
        _check_count("steps", self.steps)


def sample_rate_for(expected_batch_size: int, num_sequences: int) -> float:
    """Poisson sampling rate giving ``expected_batch_size`` in expectation (at most 1).

    The q of :class:`SampledGaussianSteps`: the privacy plan and DP-SGD compute it alike.
    """
    return min(1.0, expected_batch_size / num_sequences)


RELEASE_PURPOSES = ("", "profile", "utility", "evaluation", "consensus")


@dataclass(frozen=True)
class GaussianRelease:
    """`count` releases of a sensitivity-1 statistic with Gaussian noise multiplier σ.

    Used for statistics computed over all of a hospital's records (no sampling), e.g. a noisy
    record count reported to the server. ``purpose`` names the release in the ledger (which
    statistic of the release inventory it paid for); accountants ignore it.
    """

    kind: ClassVar[str] = "gaussian_release"

    noise_multiplier: float
    count: int = 1
    purpose: str = ""

    def __post_init__(self) -> None:
        """Validate eagerly so an invalid mechanism can never reach a ledger."""
        _check_positive_real("noise_multiplier", self.noise_multiplier)
        _check_count("count", self.count)
        if self.purpose not in RELEASE_PURPOSES:
            raise ValueError(f"purpose must be one of {RELEASE_PURPOSES}, got {self.purpose!r}")


PrivacyEvent = SampledGaussianSteps | GaussianRelease

_EVENT_TYPES: dict[str, type[SampledGaussianSteps] | type[GaussianRelease]] = {
    cls.kind: cls for cls in (SampledGaussianSteps, GaussianRelease)
}


def _check_event(event: object) -> None:
    """Fail loudly on objects that are not privacy events instead of mis-accounting them."""
    if not isinstance(event, SampledGaussianSteps | GaussianRelease):
        raise TypeError(f"expected a PrivacyEvent, got {type(event).__name__}")


def to_dp_event(events: Sequence[PrivacyEvent]) -> dp_accounting.DpEvent:
    """Translate events into one dp_accounting event: the composition of all of them."""
    parts: list[dp_accounting.DpEvent] = []
    for event in events:
        _check_event(event)
        if isinstance(event, SampledGaussianSteps):
            step = dp_accounting.PoissonSampledDpEvent(
                event.sample_rate, dp_accounting.GaussianDpEvent(event.noise_multiplier)
            )
            parts.append(dp_accounting.SelfComposedDpEvent(step, event.steps))
        else:
            release = dp_accounting.GaussianDpEvent(event.noise_multiplier)
            parts.append(dp_accounting.SelfComposedDpEvent(release, event.count))
    return dp_accounting.ComposedDpEvent(parts)


def canonical_events(events: Sequence[PrivacyEvent]) -> tuple[PrivacyEvent, ...]:
    """Return an equivalent, minimal, order-independent form of a composition of events.

    Composition is commutative and running a mechanism n then m times is running it n + m
    times, so events with equal parameters merge into one. Accountants then do one
    self-composition per distinct mechanism instead of one per round, and the result is a
    hashable cache key that does not depend on how a schedule was split into rounds.
    """
    repeats: Counter[PrivacyEvent] = Counter()
    for event in events:
        _check_event(event)
        if isinstance(event, SampledGaussianSteps):
            repeats[dataclasses.replace(event, steps=1)] += event.steps
        else:
            repeats[dataclasses.replace(event, count=1)] += event.count
    merged = [
        dataclasses.replace(event, steps=n)
        if isinstance(event, SampledGaussianSteps)
        else dataclasses.replace(event, count=n)
        for event, n in repeats.items()
    ]
    return tuple(sorted(merged, key=lambda e: (e.kind, *dataclasses.astuple(e))))


def event_to_dict(event: PrivacyEvent) -> dict[str, Any]:
    """Serialise an event to a JSON-able dict tagged with its `kind`."""
    _check_event(event)
    return {"kind": event.kind, **dataclasses.asdict(event)}


def event_from_dict(data: Mapping[str, Any]) -> PrivacyEvent:
    """Parse a dict written by `event_to_dict`, rejecting anything malformed.

    Ledgers outlive code versions, so unknown kinds, missing or unexpected fields and invalid
    values raise ValueError naming the offending field rather than being guessed at.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"event must be a mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in _EVENT_TYPES:
        raise ValueError(f"kind must be one of {sorted(_EVENT_TYPES)}, got {kind!r}")
    cls = _EVENT_TYPES[kind]
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unexpected = sorted(set(data) - names - {"kind"})
    if unexpected:
        raise ValueError(f"unexpected field(s) for {kind}: {', '.join(unexpected)}")
    for f in fields:
        required = f.default is dataclasses.MISSING
        if required and f.name not in data:
            raise ValueError(f"missing field for {kind}: {f.name}")
    return cls(**{name: data[name] for name in names if name in data})
