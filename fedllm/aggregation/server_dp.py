"""Optional server-side DP: a hospital-level guarantee on the aggregate of adapter updates.

Each hospital's delta (its new adapter minus the global one) is clipped to L2 norm C, the
clipped deltas are averaged with equal weights over the cohort size m, and Gaussian noise of
standard deviation σC/m is added (McMahan et al. 2018, "Learning differentially private
recurrent language models"). Adding or removing one hospital changes the sum of clipped deltas
by at most C, so each round is a Gaussian mechanism with noise multiplier σ on HOSPITALS:
user-level DP where the user is a whole hospital.

This guarantee is separate from, and in addition to, the record-level DP-SGD guarantee each
hospital enforces on its own records (DESIGN.md §3). It protects which hospitals took part and
what their whole datasets looked like, against anyone who sees the global adapter; it is not
charged to the hospitals' record-level ledgers. The server sees the raw deltas, so it is trusted
here (central DP), unlike under the record-level guarantee.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dp_accounting
import torch
from flwr.supercore.differential_privacy import compute_adaptive_noise_params, compute_stdv

from fedllm.aggregation.rules import AdapterState, check_compatible, weighted_mean

ServerDpMode = Literal["off", "fixed", "adaptive"]
SERVER_DP_MODES: tuple[str, ...] = ("off", "fixed", "adaptive")

# Weights closer than this (relatively) count as equal; they come from float arithmetic.
_EQUAL_WEIGHTS_RTOL = 1e-9


@dataclass(frozen=True)
class ServerDpConfig:
    """Server-side DP settings.

    mode: "off" (plain weighted mean, no hospital-level guarantee), "fixed" (clip to
        `clip_norm`) or "adaptive" (start at `clip_norm`, move it toward a quantile).
    noise_multiplier: σ of the whole per-round mechanism, in units of the clip norm. In
        adaptive mode it covers the update AND the clipped count together (see
        `ServerSideDp`), so accounting uses σ for both modes.
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
    with multiplier σ (Andrew et al. Thm. 1, Flower's `compute_adaptive_noise_params`). The
    clip norm then moves geometrically toward the γ-quantile of delta norms:
    C ← C·exp(−η(b̃ − γ)), b̃ the noised fraction of unclipped deltas.

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
        mode = self._config.mode
        if mode == "off":
            uniform = [1.0] * len(deltas)
            mean = weighted_mean(deltas, uniform if weights is None else weights)
            return mean, {"mode": mode, "cohort_size": len(deltas)}
        _check_equal_weights(weights, len(deltas))
        m = len(deltas) if cohort_size is None else int(cohort_size)
        if m < len(deltas):
            raise ValueError(f"cohort_size={cohort_size!r} is smaller than {len(deltas)} deltas")
        rng = _secure_generator() if generator is None else generator
        clip_norm = self._clip_norm
        clipped = [clip_delta(delta, clip_norm) for delta in deltas]

        sigma = self._config.noise_multiplier
        count_stddev = 0.0
        if mode == "adaptive":
            count_stddev, sigma = compute_adaptive_noise_params(
                self._config.noise_multiplier, m, self._config.clipped_count_stddev
            )
        stddev = compute_stdv(sigma, clip_norm, m)
        mean: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key in keys:
            total = sum((_f64(c[key]) for c, _ in clipped), torch.zeros(()))
            noise = torch.randn(total.shape, generator=rng, dtype=torch.float64) * stddev
            mean[key] = (total / m + noise).to(deltas[0][key].dtype)

        record: dict[str, Any] = {
            "mode": mode,
            "cohort_size": m,
            "clip_norm": clip_norm,
            "noise_multiplier": self._config.noise_multiplier,
            "update_noise_multiplier": sigma,
            "noise_stddev": stddev,
        }
        if mode == "adaptive":
            unclipped = sum(norm <= clip_norm for _, norm in clipped)
            count_noise = float(torch.randn((), generator=rng, dtype=torch.float64))
            centred = unclipped - len(deltas) / 2 + count_stddev * count_noise
            fraction = centred / m + 0.5
            self._clip_norm = clip_norm * math.exp(
                -self._config.clip_learning_rate * (fraction - self._config.target_quantile)
            )
            record["clipped_count_stddev"] = count_stddev
            record["noised_unclipped_fraction"] = fraction
        record["next_clip_norm"] = self._clip_norm
        return mean, record


def server_dp_event(
    config: ServerDpConfig,
    cohort_size: int,
    num_hospitals: int,
    uniform_poisson_selection: bool,
) -> dp_accounting.DpEvent:
    """The per-round HOSPITAL-level DP event of server-side DP (compose it over rounds).

    - mode "off": `NonPrivateDpEvent`: the aggregate carries no hospital-level guarantee
      (each hospital's records are still protected by its own DP-SGD).
    - uniform Poisson selection (each of the N hospitals joins independently with the same
      q = K/N, regardless of data): amplification by sampling may be claimed,
      `PoissonSampledDpEvent(q, GaussianDpEvent(σ))`.
    - any other selection, in particular fedllm's utility-driven cohorts (which depend on
      hospitals' private loss statistics) or non-uniform inclusion probabilities: NO
      amplification, `GaussianDpEvent(σ)` each round, as if every hospital took part (q = 1).
      Selection that looks at the data can single a hospital out, so the randomness of
      "who was picked" cannot be counted as hiding anyone.

    The event is over hospitals (add or remove one hospital's whole dataset), in addition to
    and separate from the record-level events in each hospital's ledger.
    """
    if config.mode == "off":
        return dp_accounting.NonPrivateDpEvent()
    if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
        raise ValueError(f"cohort_size must be an integer >= 1, got {cohort_size!r}")
    if isinstance(num_hospitals, bool) or not isinstance(num_hospitals, int):
        raise ValueError(f"num_hospitals must be an integer, got {num_hospitals!r}")
    if num_hospitals < cohort_size:
        raise ValueError(f"num_hospitals={num_hospitals} is smaller than cohort_size")
    gaussian = dp_accounting.GaussianDpEvent(config.noise_multiplier)
    q = cohort_size / num_hospitals
    if not uniform_poisson_selection or q >= 1:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(q, gaussian)
