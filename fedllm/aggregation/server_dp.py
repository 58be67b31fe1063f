"""Optional server-side DP: a hospital-level guarantee on the aggregate of adapter updates.

Each hospital's delta (its new adapter minus the global one) is clipped to L2 norm C, the
clipped deltas are averaged with equal weights over the cohort size m, and Gaussian noise of
standard deviation σC/m is added (McMahan et al. 2018, "Learning differentially private
recurrent language models"): user-level DP where the user is a whole hospital, for the
add-or-remove-one-hospital relation.

What one round costs depends on how the cohort is chosen, not only on C
(`selection_sensitivity`). The released sum is Σ_{i∈S(D)} clip(Δ_i), and removing hospital h
changes both h's term and, possibly, the cohort S itself:

- **every hospital that can take part is in the cohort** (cohort size K = N hospitals): the
  cohort is all eligible hospitals, eligibility depends only on each hospital's own ledger, so
  removing h removes exactly its term: sensitivity C.
- **a fixed-size cohort of K < N chosen uniformly at random**: removing a selected h frees its
  place and another hospital h' takes it, so the sum moves by clip(Δ_h') − clip(Δ_h), up to 2C
  (opposite deltas). Couple the two draws (if h was drawn, replace it by a uniform draw from
  the hospitals not drawn; the result is uniform over K-subsets without h): every coupled pair
  of cohorts differs by at most that one swap, and joint convexity of the hockey-stick
  divergence carries the 2C bound over to the mixture. Sensitivity 2C.
- **a fixed-size cohort of K < N chosen from the data** (Oort utilities, the redundancy
  QUBO, a subclass's hooks): utilities and profiles are released with unit-level noise only,
  so at hospital level they are not private, and every hospital's utility depends on the others
  (normalised by Σ n_j, straggler factors relative to the median duration, pairwise
  redundancy). Removing h, even an h that was not selected, can reshuffle the whole cohort.
  With S ⊆ E, S' ⊆ E∖{h} (E the eligible hospitals, |E| ≤ N) and |S| = |S'| = K, the sum moves
  by at most |S Δ S'|·C = (2K − 2|S ∩ S'|)·C ≤ min(2K, 2(N − K))·C, since |S ∩ S'| ≥ 2K − |E|;
  with |E| ≤ K the cohort is all eligible hospitals and it moves by C. This is the bound used;
  it equals 2C for K = 1 and K = N − 1 and grows to N·C for K = N/2. It is reachable: with
  Oort's utilities, removing a hospital that was not even selected rescales every utility
  and can swap the whole cohort (tests/test_server_dp_accounting.py), and the QUBO can make a
  different set of K mutually diverse hospitals optimal.

The round is therefore accounted as a Gaussian with sensitivity Δ = k·C, k the
`sensitivity_clip_multiple`, expressed as the sensitivity-1 Gaussian the accountant expects
with the effective noise multiplier σ_eff = σ·C/Δ = σ/k. No amplification by sampling is
claimed for fixed-size cohorts: a fixed-size choice is not Poisson sampling, and a data-driven
choice can single a hospital out.

Adaptive mode also releases the centred count Σ_{i∈S}(b_i − ½) of unclipped deltas
(b_i = 1{‖Δ_i‖ ≤ C}). Removing h without a replacement moves it by ½; a swap h → h' moves it by
(b_h' − ½) − (b_h − ½) = b_h' − b_h ∈ {−1, 0, 1}, i.e. by at most 1 = 2·½, in either direction;
in general it moves by at most |S Δ S'|/2. So the count's sensitivity is k/2 whenever the
update's is k·C, the same multiple k. The pair (update/C with noise σ_Δ, count with noise σ_b)
is one Gaussian on a vector whose whitened sensitivity is
k·(σ_Δ⁻² + (2σ_b)⁻²)^(1/2) = k/σ (Andrew et al. 2021, Thm. 1, with both sensitivities scaled by
k), so adaptive rounds are accounted with the same σ_eff = σ/k, conservatively: it charges the
worst case of update and count moving together.

This guarantee is separate from, and in addition to, the unit-level (patient) DP-SGD guarantee
each hospital enforces on its own records (docs/privacy.md). It protects which hospitals took
part and what their whole datasets looked like, against anyone who sees the global adapter; it
is not charged to the hospitals' unit-level ledgers. The server sees the raw deltas, so it is
trusted here (central DP), unlike under the unit-level guarantee. Its composed ε over the
rounds that applied it is `compose_server_side_guarantee`, reported as ``privacy.server_side``.

Flower's helpers are used where their signatures fit (`compute_stdv`,
`compute_adaptive_noise_params`). Clipping, noise and the clip-norm update are written here:
Flower's versions mutate numpy arrays in place, draw noise from numpy's global RNG (no
generator to seed or to replace by a secure one), and its server-side adaptive strategy feeds
the *clipped* fraction to the geometric update, which moves C away from the target quantile.
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import dp_accounting
import torch
from flwr.supercore.differential_privacy import compute_adaptive_noise_params, compute_stdv

from fedllm.aggregation.rules import (
    AdapterState,
    apply_delta,
    check_compatible,
    update_delta,
    weighted_mean,
)
from fedllm.privacy.accountant import PLD_VALUE_DISCRETIZATION_INTERVAL, compute_epsilon
from fedllm.privacy.events import GaussianRelease, event_to_dict

if TYPE_CHECKING:
    from fedllm.config.schema import ExperimentConfig

ServerDpMode = Literal["off", "fixed", "adaptive"]
SERVER_DP_MODES: tuple[str, ...] = ("off", "fixed", "adaptive")

# The hospital-level ε is always reported from PLD, the project's default tight accountant.
SERVER_SIDE_ACCOUNTANT = "pld"
# δ of the hospital-level guarantee when privacy.delta is not in force (DP-SGD off).
DEFAULT_SERVER_SIDE_DELTA = 1e-5

# Weights closer than this (relatively) count as equal; they come from float arithmetic.
_EQUAL_WEIGHTS_RTOL = 1e-9


@dataclass(frozen=True)
class ServerDpConfig:
    """Server-side DP settings.

    mode: "off" (plain weighted mean, no hospital-level guarantee), "fixed" (clip to
        `clip_norm`) or "adaptive" (start at `clip_norm`, move it toward a quantile).
    noise_multiplier: σ of the whole per-round mechanism, in units of the clip norm. In
        adaptive mode it covers the update AND the clipped count together (see
        `ServerSideDp`), so both modes are accounted with the same σ/k, k the selection's
        sensitivity multiple (`selection_sensitivity`).
    clip_norm: C, the bound on one hospital's delta (the initial C in adaptive mode).
    target_quantile: γ, the fraction of hospitals whose delta should fit under C (adaptive).
    clip_learning_rate: η of the geometric update C ← C·exp(−η(b̃ − γ)) (adaptive).
    clipped_count_stddev: σ_b, the noise on the count of unclipped deltas (adaptive); None
        uses Andrew et al.'s recommendation of m/20 for cohort size m.
    """

    mode: ServerDpMode = "off"
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None

    def __post_init__(self) -> None:
        """Validate eagerly: a bad DP configuration must fail before any round runs."""
        if self.mode not in SERVER_DP_MODES:
            raise ValueError(f"mode must be one of {SERVER_DP_MODES}, got {self.mode!r}")
        if self.mode == "off":
            return
        for name in ("noise_multiplier", "clip_norm"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0 in {self.mode} mode")
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(f"target_quantile must be in [0, 1], got {self.target_quantile!r}")
        if not self.clip_learning_rate > 0:
            raise ValueError(f"clip_learning_rate must be > 0, got {self.clip_learning_rate!r}")
        if self.clipped_count_stddev is not None and not self.clipped_count_stddev > 0:
            raise ValueError(f"clipped_count_stddev must be > 0, got {self.clipped_count_stddev!r}")


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    """A detached float64 CPU copy, so norms and noise do not suffer low-precision rounding."""
    return tensor.detach().cpu().to(torch.float64)


def global_norm(delta: AdapterState) -> float:
    """L2 norm of all tensors of `delta` flattened into one vector."""
    return math.sqrt(math.fsum(float(_f64(t).square().sum()) for t in delta.values()))


def clip_delta(
    delta: AdapterState, clip_norm: float
) -> tuple[OrderedDict[str, torch.Tensor], float]:
    """Scale `delta` by min(1, C/‖delta‖) and return it with its original global L2 norm.

    The norm is taken over all tensors together (Flower's "flat clipping"), since the
    sensitivity argument bounds one hospital's whole contribution, not each layer's.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm!r}")
    norm = global_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = OrderedDict((key, (_f64(t) * scale).to(t.dtype)) for key, t in delta.items())
    return clipped, norm


def _secure_generator() -> torch.Generator:
    """A generator seeded from the OS's CSPRNG: noise whose seed nobody can know or replay."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def _check_equal_weights(weights: Sequence[float] | None, count: int) -> None:
    """Refuse unequal weights under server DP: they void the sensitivity bound.

    With normalised weights w_i, one hospital moves the mean by up to w_i·C, and the largest
    w_i exceeds 1/m whenever weights differ, so noise σC/m would under-protect the heaviest
    hospital. Example-count or inclusion (n_i/π_i) weights are therefore incompatible with
    this mechanism; their noise would have to be calibrated to max_i w_i instead.
    """
    if weights is None:
        return
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"weights: got {len(values)} values for {count} deltas")
    if any(not math.isclose(w, values[0], rel_tol=_EQUAL_WEIGHTS_RTOL) for w in values):
        raise ValueError(
            "server-side DP averages clipped deltas with equal weights: unequal weights let "
            "one hospital move the mean by more than C/m, so σC/m noise would not bound its "
            "influence; pass weights=None"
        )


class ServerSideDp:
    """Aggregates cohort deltas under the configured server-side DP mode, round after round.

    Adaptive mode (Andrew et al. 2021, "Differentially private learning with adaptive
    clipping") also releases, each round, the number of hospitals whose delta norm was ≤ C,
    centred as Σ_i (b_i − ½) + N(0, σ_b²) so that one hospital changes it by at most ½. That
    count is a second Gaussian mechanism on the same hospitals; the update noise is raised to
    σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) so that the two together cost exactly one Gaussian mechanism
    with multiplier σ per hospital entering or leaving the sum (Andrew et al. Thm. 1, Flower's
    `compute_adaptive_noise_params`); a swap of one hospital for another is accounted with
    σ/2 (module docstring). The clip norm then moves geometrically toward the γ-quantile of
    delta norms: C ← C·exp(−η(b̃ − γ)), b̃ the noised fraction of unclipped deltas.

    The current clip norm is state; pass the last recorded `next_clip_norm` as `clip_norm`
    to resume a run.
    """

    def __init__(self, config: ServerDpConfig, *, clip_norm: float | None = None) -> None:
        self._config = config
        self._clip_norm = float(config.clip_norm if clip_norm is None else clip_norm)
        if config.mode != "off" and not (math.isfinite(self._clip_norm) and self._clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm!r}")

    @property
    def config(self) -> ServerDpConfig:
        """The settings this aggregator was built with."""
        return self._config

    @property
    def clip_norm(self) -> float:
        """The clip norm the next `aggregate` call will use."""
        return self._clip_norm

    def aggregate(
        self,
        deltas: Sequence[AdapterState],
        weights: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        *,
        cohort_size: int | None = None,
    ) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:
        """Return the (noised) mean delta and a record of the round's DP parameters.

        `cohort_size` is m, the public number of hospitals selected (defaults to
        len(deltas)). Dividing by it rather than by the number of replies keeps the
        denominator independent of the data, so the sensitivity stays C/m; a hospital that
        drops out only shrinks the mean slightly. `generator` defaults to a fresh generator
        seeded from the OS's CSPRNG; pass a seeded one only for tests and simulations, since
        noise whose seed is known can be subtracted.

        The record holds only public or noised quantities (never per-hospital norms or the
        exact clipped count), so it can be logged and published.
        """
        keys = check_compatible(deltas)
        if self._config.mode == "off":
            uniform = [1.0] * len(deltas)
            mean = weighted_mean(deltas, uniform if weights is None else weights)
            return mean, {"mode": "off", "cohort_size": len(deltas)}
        _check_equal_weights(weights, len(deltas))
        m = len(deltas) if cohort_size is None else int(cohort_size)
        if m < len(deltas):
            raise ValueError(f"cohort_size={cohort_size!r} is smaller than {len(deltas)} deltas")
        clipped, unclipped = self.clip(deltas)
        total = OrderedDict(
            (key, sum((_f64(c[key]) for c in clipped), torch.zeros(()))) for key in keys
        )
        mean, record = self.noise(
            OrderedDict((key, value / m) for key, value in total.items()),
            unclipped,
            len(deltas),
            generator,
            cohort_size=m,
        )
        return OrderedDict((key, mean[key].to(deltas[0][key].dtype)) for key in mean), record

    def clip(self, deltas: Sequence[AdapterState]) -> tuple[list[AdapterState], int]:
        """Each delta clipped to the current C, and how many were within C (the count
        adaptive mode releases, noised, in `noise`)."""
        clipped = [clip_delta(delta, self._clip_norm) for delta in deltas]
        return [c for c, _ in clipped], sum(norm <= self._clip_norm for _, norm in clipped)

    def noise(
        self,
        mean: AdapterState,
        unclipped: int,
        replies: int,
        generator: torch.Generator | None = None,
        *,
        cohort_size: int,
    ) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:
        """Release ``mean`` = Σ clipped deltas / m: Gaussian noise σ_Δ·C/m on it and, in
        adaptive mode, the noised count of the ``replies`` deltas that were within C (then C
        moves toward the target quantile). Values keep ``mean``'s dtypes; `aggregate` says
        what the record holds and why ``generator`` should stay None outside tests.
        """
        rng = _secure_generator() if generator is None else generator
        clip_norm, m = self._clip_norm, cohort_size
        sigma = self._config.noise_multiplier
        count_stddev = 0.0
        if self._config.mode == "adaptive":
            count_stddev, sigma = compute_adaptive_noise_params(
                self._config.noise_multiplier, m, self._config.clipped_count_stddev
            )
        stddev = compute_stdv(sigma, clip_norm, m)
        noised: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key, value in mean.items():
            noise = torch.randn(value.shape, generator=rng, dtype=torch.float64) * stddev
            noised[key] = (_f64(value) + noise).to(value.dtype)
        record: dict[str, Any] = {
            "mode": self._config.mode,
            "cohort_size": m,
            "clip_norm": clip_norm,
            "noise_multiplier": self._config.noise_multiplier,
            "update_noise_multiplier": sigma,
            "noise_stddev": stddev,
        }
        if self._config.mode == "adaptive":
            count_noise = float(torch.randn((), generator=rng, dtype=torch.float64))
            centred = unclipped - replies / 2 + count_stddev * count_noise
            fraction = centred / m + 0.5
            self._clip_norm = clip_norm * math.exp(
                -self._config.clip_learning_rate * (fraction - self._config.target_quantile)
            )
            record["clipped_count_stddev"] = count_stddev
            record["noised_unclipped_fraction"] = fraction
        record["next_clip_norm"] = self._clip_norm
        return noised, record


def _check_sizes(cohort_size: int, num_hospitals: int) -> None:
    """Both sizes are public integers with 1 <= K <= N; anything else is a caller's bug."""
    if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
        raise ValueError(f"cohort_size must be an integer >= 1, got {cohort_size!r}")
    if isinstance(num_hospitals, bool) or not isinstance(num_hospitals, int):
        raise ValueError(f"num_hospitals must be an integer, got {num_hospitals!r}")
    if num_hospitals < cohort_size:
        raise ValueError(f"num_hospitals={num_hospitals} is smaller than cohort_size")


def selection_sensitivity(
    cohort_size: int, num_hospitals: int, *, data_dependent_selection: bool = True
) -> int:
    """k = Δ/C: how far adding or removing one hospital can move the sum of clipped deltas.

    - K = N (every hospital that can take part is in the cohort): 1, only its own term.
    - K < N, cohort drawn uniformly at random: 2, its place goes to another hospital.
    - K < N, cohort chosen from the hospitals' statistics (`data_dependent_selection`, the
      conservative default): min(2K, 2(N − K)), since removing one hospital can reshuffle
      the cohort; the derivation is in the module docstring.

    The answer depends only on the configuration, never on a round's eligible set: choosing
    the accounting from data (e.g. "only K were eligible this round") would itself leak.
    """
    _check_sizes(cohort_size, num_hospitals)
    if cohort_size == num_hospitals:
        return 1
    if not data_dependent_selection:
        return 2
    return min(2 * cohort_size, 2 * (num_hospitals - cohort_size))


def server_dp_event(
    config: ServerDpConfig,
    cohort_size: int,
    num_hospitals: int,
    uniform_poisson_selection: bool,
    *,
    data_dependent_selection: bool = True,
) -> dp_accounting.DpEvent:
    """The per-round HOSPITAL-level DP event of server-side DP (compose it over rounds).

    - mode "off": `NonPrivateDpEvent`: the aggregate carries no hospital-level guarantee
      (each hospital's records are still protected by its own DP-SGD).
    - uniform Poisson selection (each of the N hospitals joins independently with the same
      q = K/N, regardless of data): no place is freed for anyone else, so the sensitivity is
      C, and amplification by sampling may be claimed,
      `PoissonSampledDpEvent(q, GaussianDpEvent(σ))`.
    - a fixed-size cohort (what fedllm does, in every selection mode): NO amplification, and
      the sensitivity k·C of `selection_sensitivity`, expressed as `GaussianDpEvent(σ/k)`:
      the accountant's Gaussian has sensitivity 1, and noise σC over sensitivity kC is
      exactly a sensitivity-1 Gaussian with multiplier σ/k.

    The event is for adding or removing one hospital's whole dataset (account it with the
    add-or-remove relation), in addition to and separate from the unit-level events in
    each hospital's ledger.
    """
    if config.mode == "off":
        return dp_accounting.NonPrivateDpEvent()
    _check_sizes(cohort_size, num_hospitals)
    q = cohort_size / num_hospitals
    if uniform_poisson_selection and q < 1:
        return dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(config.noise_multiplier)
        )
    multiple = selection_sensitivity(
        cohort_size, num_hospitals, data_dependent_selection=data_dependent_selection
    )
    return dp_accounting.GaussianDpEvent(config.noise_multiplier / multiple)


def server_dp_accounting(
    config: ServerDpConfig,
    cohort_size: int,
    num_hospitals: int,
    *,
    data_dependent_selection: bool = True,
) -> dict[str, Any]:
    """What one fixed-size-cohort round of server-side DP costs, as fields of its round record.

    σ and k are kept next to σ_eff = σ/k so a reader of the report sees why the effective
    noise is lower than the configured one; `event` is the project's serialised event, the
    sensitivity-1 Gaussian that `compose_server_side_guarantee` composes.
    """
    if config.mode == "off":
        raise ValueError("server-side DP is off: there is no hospital-level event to record")
    multiple = selection_sensitivity(
        cohort_size, num_hospitals, data_dependent_selection=data_dependent_selection
    )
    effective = config.noise_multiplier / multiple
    if cohort_size == num_hospitals:
        selection = "all hospitals"
    elif data_dependent_selection:
        selection = "data-dependent, fixed size"
    else:
        selection = "uniform, fixed size"
    record: dict[str, Any] = {
        "unit": "hospital",
        "neighbouring": "add-remove",
        "selection": selection,
        "num_hospitals": num_hospitals,
        "sensitivity_clip_multiple": multiple,
        "noise_multiplier": config.noise_multiplier,
        "effective_noise_multiplier": effective,
        "amplification": False,
        "event": event_to_dict(GaussianRelease(effective)),
    }
    if config.mode == "adaptive":
        # The centred count moves by 1/2 per hospital entering or leaving the sum.
        record["clipped_count_sensitivity"] = multiple / 2
    return record


def server_side_delta(privacy_enabled: bool, privacy_delta: float) -> tuple[float, str]:
    """δ of the hospital-level guarantee and where it came from.

    The run's `privacy.delta` when DP-SGD is on (one δ for every guarantee in the report);
    otherwise that setting is not in force, so the conventional 1e-5 is used and named.
    """
    if privacy_enabled:
        return float(privacy_delta), "privacy.delta"
    return DEFAULT_SERVER_SIDE_DELTA, "default (privacy.enabled is false)"


def _composed_gaussian_epsilon(composition: Sequence[Mapping[str, Any]], delta: float) -> float:
    """ε at `delta` of the rounds in `composition`, from the project's PLD accountant.

    Composing Gaussians with multipliers σ_i (sensitivity 1) is exactly one Gaussian with
    σ = (Σ_i σ_i⁻²)^(−1/2): the privacy loss of each is N(μ_i²/2, μ_i²), μ_i = 1/σ_i, and
    composition adds means and variances. So one release is accounted instead of many
    convolutions. PLD's grid covers privacy losses up to about μ²/2 + 10μ, so at the default
    interval a weakly noised run (μ of tens, ε in the thousands) needs tens of millions of
    points and gigabytes. The interval is widened to 1e-5 of that span when this exceeds the
    default (μ > ~1): still every loss is rounded up, so ε stays an upper bound, now off by at
    most 1e-5·(μ²/2 + 10μ), a relative error of order 1e-5 on ε ≈ μ²/2.
    """
    precision = math.fsum(
        int(part["rounds"]) * float(part["effective_noise_multiplier"]) ** -2
        for part in composition
    )
    if precision == 0:
        return 0.0
    mu = math.sqrt(precision)
    return compute_epsilon(
        [GaussianRelease(1 / mu)],
        delta,
        SERVER_SIDE_ACCOUNTANT,
        pld_interval=max(PLD_VALUE_DISCRETIZATION_INTERVAL, 1e-5 * (mu**2 / 2 + 10 * mu)),
        neighbouring="add-remove",
    )


def compose_server_side_guarantee(
    previous: Mapping[str, Any] | None,
    round_accounting: Mapping[str, Any],
    delta: float,
    delta_source: str,
) -> dict[str, Any]:
    """The hospital-level guarantee after one more round of server-side DP.

    `previous` is the last guarantee (None before the first round; a resumed run passes the
    one in its report), `round_accounting` the round's `server_dp_accounting` fields. Rounds
    are kept as runs of equal σ_eff (`composition`), so a run resumed with other settings
    still composes every round it released, and ε is re-derived from all of them with the
    project's PLD accountant under add-or-remove-one-hospital.
    """
    effective = float(round_accounting["effective_noise_multiplier"])
    composition = [dict(part) for part in (previous or {}).get("composition", [])]
    if composition and composition[-1]["effective_noise_multiplier"] == effective:
        composition[-1]["rounds"] += 1
    else:
        composition.append({"effective_noise_multiplier": effective, "rounds": 1})
    epsilon = _composed_gaussian_epsilon(composition, delta)
    return {
        "epsilon": epsilon,
        "delta": delta,
        "delta_source": delta_source,
        "sensitivity_clip_multiple": round_accounting["sensitivity_clip_multiple"],
        "noise_multiplier": round_accounting["noise_multiplier"],
        "effective_noise_multiplier": effective,
        "rounds": sum(int(part["rounds"]) for part in composition),
        "unit": "hospital",
        "neighbouring": "add-remove",
        "selection": round_accounting["selection"],
        "amplification": False,
        "accountant": SERVER_SIDE_ACCOUNTANT,
        "composition": composition,
    }


class HospitalLevelDp:
    """Server-side DP as one run applies it, in the three steps a wrapper strategy needs.

    The seam between any strategy and the hospital-level guarantee
    (``fedllm.strategies.server_dp.HospitalLevelDpStrategy`` calls it): `clip` each hospital's
    adapter to within C of the global one, let the wrapped strategy combine the clipped
    adapters (`mean` is the combination the guarantee is proven for: equal weights over the
    public cohort size m), then `release` that aggregate with Gaussian noise, returning the
    new global adapter and the round's record (the mechanism's parameters and
    `server_dp_accounting`). `guarantee_after` composes that record onto the previous
    guarantee.
    """

    def __init__(
        self,
        config: ServerDpConfig,
        *,
        cohort_size: int,
        num_hospitals: int,
        delta: float,
        delta_source: str,
    ) -> None:
        if config.mode == "off":
            raise ValueError("server-side DP is off: use no HospitalLevelDp at all")
        self.mechanism = ServerSideDp(config)
        self.cohort_size = cohort_size
        self.num_hospitals = num_hospitals
        self.delta = delta
        self.delta_source = delta_source

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> HospitalLevelDp | None:
        """The server-side DP an experiment asks for (``strategy.server_dp``), or None (off)."""
        settings = config.strategy.server_dp
        if settings.mode == "off":
            return None
        delta, source = server_side_delta(config.privacy.enabled, config.privacy.delta)
        return cls(
            ServerDpConfig(**settings.model_dump()),
            cohort_size=config.federation.cohort_size,
            num_hospitals=config.federation.num_hospitals,
            delta=delta,
            delta_source=source,
        )

    def clip(
        self, adapters: Sequence[AdapterState], current: AdapterState
    ) -> tuple[list[AdapterState], int]:
        """Each adapter moved to within C of ``current``, and how many already were."""
        deltas = [update_delta(adapter, current) for adapter in adapters]
        clipped, unclipped = self.mechanism.clip(deltas)
        return [apply_delta(current, delta) for delta in clipped], unclipped

    def mean(self, clipped: Sequence[AdapterState], current: AdapterState) -> AdapterState:
        """current + Σ (clipped − current) / m: a missing reply only shrinks the step, so
        one hospital moves it by at most C/m."""
        total = OrderedDict(
            (key, sum((_f64(a[key]) - _f64(current[key]) for a in clipped), torch.zeros(())))
            for key in check_compatible([current, *clipped])
        )
        return apply_delta(
            current, OrderedDict((k, v / self.cohort_size) for k, v in total.items())
        )

    def release(
        self,
        aggregate: AdapterState,
        current: AdapterState,
        *,
        replies: int,
        unclipped: int,
        data_dependent_selection: bool,
    ) -> tuple[AdapterState, dict[str, Any]]:
        """The noised new global adapter and the round's ``server_dp`` record (public values).

        ``aggregate`` is the combination of ``replies`` clipped adapters, ``unclipped`` of
        which were within C before clipping; the noise is σ·C/m around its step from
        ``current``, and the accounting's sensitivity follows the selection.
        """
        step = update_delta(aggregate, current)
        noised, record = self.mechanism.noise(
            OrderedDict((key, _f64(value)) for key, value in step.items()),
            unclipped,
            replies,
            cohort_size=self.cohort_size,
        )
        accounting = server_dp_accounting(
            self.mechanism.config,
            self.cohort_size,
            self.num_hospitals,
            data_dependent_selection=data_dependent_selection,
        )
        return apply_delta(current, noised), record | accounting

    def guarantee_after(
        self, previous: Mapping[str, Any] | None, round_record: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The hospital-level guarantee once ``round_record``'s round is released."""
        return compose_server_side_guarantee(previous, round_record, self.delta, self.delta_source)
