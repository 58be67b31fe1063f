"""Aggregation rules against numpy, unbiasedness under non-uniform selection, server-side DP."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict

import dp_accounting
import numpy as np
import pytest
import scipy.stats
import structlog
import torch
from dp_accounting.pld import PLDAccountant
from structlog.testing import capture_logs

from fedllm.aggregation import (
    ServerDpConfig,
    ServerSideDp,
    apply_delta,
    clip_delta,
    coordinate_median,
    global_norm,
    inclusion_weights,
    server_dp_event,
    trimmed_mean,
    update_delta,
    weighted_mean,
)

SHAPES = {"lora_A": (4, 3), "lora_B": (3, 5)}


def _random_updates(n: int, seed: int, dtype: torch.dtype = torch.float32) -> list[OrderedDict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        OrderedDict(
            (key, torch.randn(shape, generator=generator, dtype=dtype))
            for key, shape in SHAPES.items()
        )
        for _ in range(n)
    ]


def _stack(updates: list[OrderedDict], key: str) -> np.ndarray:
    return np.stack([u[key].double().numpy() for u in updates])


def test_weighted_mean_matches_numpy() -> None:
    updates = _random_updates(4, seed=0)
    weights = [1.0, 2.5, 0.0, 7.0]
    result = weighted_mean(updates, weights)
    assert list(result) == list(SHAPES)
    for key in SHAPES:
        expected = np.average(_stack(updates, key), axis=0, weights=weights)
        assert result[key].dtype == torch.float32
        np.testing.assert_allclose(result[key].numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, -1.0, 1.0], ">= 0"),
        ([0.0, 0.0, 0.0], "all zero"),
        ([1.0, math.nan, 1.0], ">= 0"),
        ([1.0, 1.0], "2 values for 3"),
    ],
)
def test_weighted_mean_rejects_bad_weights(weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_mean(_random_updates(3, seed=1), weights)


def test_rules_reject_incompatible_updates() -> None:
    a, b = _random_updates(2, seed=2)
    with pytest.raises(ValueError, match="different keys"):
        weighted_mean([a, OrderedDict(lora_A=b["lora_A"])], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        trimmed_mean([a, OrderedDict(lora_A=b["lora_A"].T, lora_B=b["lora_B"])], 0.0)
    with pytest.raises(ValueError, match="at least one"):
        coordinate_median([])
    with pytest.raises(ValueError, match="non-floating"):
        weighted_mean([OrderedDict(x=torch.ones(2, dtype=torch.int64))], [1.0])


@pytest.mark.parametrize(("n", "trim"), [(7, 0.2), (10, 0.25), (5, 0.0), (9, 0.49)])
def test_trimmed_mean_matches_scipy(n: int, trim: float) -> None:
    updates = _random_updates(n, seed=n)
    result = trimmed_mean(updates, trim)
    for key in SHAPES:
        stacked = _stack(updates, key)
        cut = math.floor(trim * n)
        by_hand = np.sort(stacked, axis=0)[cut : n - cut].mean(axis=0)
        np.testing.assert_allclose(result[key].numpy(), by_hand, rtol=1e-6, atol=1e-6)
        reference = scipy.stats.trim_mean(stacked, trim, axis=0)
        np.testing.assert_allclose(result[key].numpy(), reference, rtol=1e-6, atol=1e-6)


def test_trimmed_mean_ignores_an_outlier() -> None:
    honest = [OrderedDict(w=torch.full((3,), 1.0 + 0.01 * i)) for i in range(5)]
    poisoned = [*honest, OrderedDict(w=torch.full((3,), 1e6))]
    robust = trimmed_mean(poisoned, 0.2)["w"]
    assert torch.allclose(robust, torch.full((3,), 1.025), atol=1e-5)
    assert weighted_mean(poisoned, [1.0] * 6)["w"].min() > 1e5
    assert coordinate_median(poisoned)["w"].max() < 1.1


@pytest.mark.parametrize("n", [1, 4, 7])
def test_coordinate_median_matches_numpy(n: int) -> None:
    updates = _random_updates(n, seed=10 + n, dtype=torch.float64)
    result = coordinate_median(updates)
    for key in SHAPES:
        np.testing.assert_allclose(result[key].numpy(), np.median(_stack(updates, key), axis=0))


@pytest.mark.parametrize(
    ("n", "trim", "warned"),
    [
        (3, 0.2, True),
        (4, 0.2, True),
        (5, 0.2, False),
        (4, 0.25, False),
        (2, 0.4, True),
        (4, 0.0, False),
    ],
)
def test_trimmed_mean_warns_when_it_trims_nothing(n: int, trim: float, warned: bool) -> None:
    """floor(0.2 · K) = 0 for K <= 4: the default trims nothing and must say so."""
    structlog.reset_defaults()  # an earlier test may have configured a level that drops it
    updates = _random_updates(n, seed=n)
    with capture_logs() as logs:
        result = trimmed_mean(updates, trim)
    events = [e for e in logs if e["event"] == "aggregation.trimmed_mean_trims_nothing"]
    assert bool(events) == warned
    if warned:
        assert events[0]["log_level"] == "warning"
        assert events[0]["updates"] == n
        assert "unweighted mean" in events[0]["reason"]
        for key in SHAPES:
            np.testing.assert_allclose(
                result[key].numpy(), _stack(updates, key).mean(axis=0), rtol=1e-6, atol=1e-6
            )


def test_trimmed_mean_rejects_bad_fractions() -> None:
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="trim_fraction"):
            trimmed_mean(_random_updates(3, seed=3), bad)


def test_delta_round_trip() -> None:
    reference, new = _random_updates(2, seed=4, dtype=torch.float64)
    delta = update_delta(new, reference)
    for key in SHAPES:
        np.testing.assert_allclose(delta[key].numpy(), (new[key] - reference[key]).numpy())
    restored = apply_delta(reference, delta)
    assert list(restored) == list(reference)
    for key in SHAPES:
        torch.testing.assert_close(restored[key], new[key])


def test_inclusion_weights_are_normalised_and_validated() -> None:
    weights = inclusion_weights([10, 30, 60], [0.5, 1.0, 0.2])
    raw = np.array([20.0, 30.0, 300.0])
    np.testing.assert_allclose(weights, raw / raw.sum())
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            inclusion_weights([1, 1], [0.5, bad])


# --- Unbiasedness under non-uniform selection -------------------------------------------------
#
# N = 6 hospitals, cohorts of K = 3 drawn by successive sampling without replacement with
# probability proportional to a fixed propensity p_i (renormalised over those not yet drawn).
# Exact cohort probabilities P(S) and inclusion probabilities π_i come from enumerating the
# 6·5·4 ordered draws. Monte-Carlo draws use the Gumbel-top-k trick: the K largest
# log p_i + Gumbel_i are distributed exactly as that successive sampling, and are vectorised.

N_EXAMPLES = np.array([50.0, 120.0, 80.0, 300.0, 30.0, 200.0])
PROPENSITY = np.array([0.04, 0.08, 0.12, 0.16, 0.25, 0.35])
COHORT = 3
DRAWS = 40_000
Z = 4.0  # Monte-Carlo tolerance in standard errors


def _cohort_probabilities() -> dict[tuple[int, ...], float]:
    p = PROPENSITY / PROPENSITY.sum()
    probabilities: dict[tuple[int, ...], float] = {}
    for order in itertools.permutations(range(len(p)), COHORT):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        cohort = tuple(sorted(order))
        probabilities[cohort] = probabilities.get(cohort, 0.0) + prob
    return probabilities


def _hospital_updates() -> list[OrderedDict]:
    # Updates correlate with propensity, so favouring likely hospitals visibly biases a mean.
    return [
        OrderedDict(w=torch.tensor([10.0 * q, (-1.0) ** i * q, float(i)], dtype=torch.float64))
        for i, q in enumerate(PROPENSITY)
    ]


def test_horvitz_thompson_is_unbiased_under_non_uniform_selection() -> None:
    cohort_probability = _cohort_probabilities()
    assert math.isclose(sum(cohort_probability.values()), 1.0, rel_tol=1e-12)
    pi = np.zeros(len(PROPENSITY))
    for cohort, prob in cohort_probability.items():
        pi[list(cohort)] += prob
    assert math.isclose(pi.sum(), COHORT, rel_tol=1e-12)
    assert pi.max() / pi.min() > 3  # genuinely non-uniform selection

    updates = _hospital_updates()
    target = np.average([u["w"].numpy() for u in updates], axis=0, weights=N_EXAMPLES)
    total = float(N_EXAMPLES.sum())

    def estimates(cohort: tuple[int, ...]) -> dict[str, np.ndarray]:
        chosen = [updates[i] for i in cohort]
        n, p = N_EXAMPLES[list(cohort)].tolist(), pi[list(cohort)].tolist()
        return {
            # Horvitz–Thompson, the exactly unbiased reference: Σ_S (n_i/π_i) u_i / Σ_j n_j
            "ht": sum(
                ni / (pi_i * total) * u["w"].numpy()
                for ni, pi_i, u in zip(n, p, chosen, strict=True)
            ),
            "ratio": weighted_mean(chosen, inclusion_weights(n, p))["w"].numpy(),
            "naive": weighted_mean(chosen, n)["w"].numpy(),
        }

    per_cohort = {cohort: estimates(cohort) for cohort in cohort_probability}
    exact = {
        name: sum(prob * per_cohort[c][name] for c, prob in cohort_probability.items())
        for name in ("ht", "ratio", "naive")
    }
    np.testing.assert_allclose(exact["ht"], target, rtol=1e-12, atol=1e-12)
    naive_bias = np.abs(exact["naive"] - target).max()
    assert np.abs(exact["ratio"] - target).max() < naive_bias

    rng = np.random.default_rng(2024)
    keys = np.log(PROPENSITY) + rng.gumbel(size=(DRAWS, len(PROPENSITY)))
    chosen = np.sort(np.argpartition(-keys, COHORT - 1, axis=1)[:, :COHORT], axis=1)
    cohorts, counts = np.unique(chosen, axis=0, return_counts=True)
    frequency = {tuple(int(i) for i in c): int(k) for c, k in zip(cohorts, counts, strict=True)}
    assert set(frequency) <= set(cohort_probability)
    empirical_pi = np.bincount(chosen.ravel(), minlength=len(pi)) / DRAWS
    pi_se = np.sqrt(pi * (1 - pi) / DRAWS)
    assert np.all(np.abs(empirical_pi - pi) < Z * pi_se)

    for name in ("ht", "naive"):
        values = np.stack([per_cohort[c][name] for c in frequency])
        weights = np.array(list(frequency.values()), dtype=float) / DRAWS
        mc_mean = weights @ values
        standard_error = np.sqrt(weights @ (values - mc_mean) ** 2 / DRAWS)
        deviation = np.abs(mc_mean - target) / standard_error
        if name == "ht":
            assert np.all(deviation < Z), deviation
        else:
            assert deviation.max() > 10, deviation  # the naive mean is measurably biased


# --- Server-side DP ---------------------------------------------------------------------------


def test_clip_delta_bounds_the_global_norm() -> None:
    for scale in (0.01, 1.0, 100.0):
        (delta,) = _random_updates(1, seed=int(scale * 100), dtype=torch.float64)
        delta = OrderedDict((k, v * scale) for k, v in delta.items())
        norm = math.sqrt(sum(float((v**2).sum()) for v in delta.values()))
        clipped, original = clip_delta(delta, 1.0)
        assert original == pytest.approx(norm, rel=1e-12)
        assert global_norm(clipped) <= 1.0 + 1e-12
        if norm <= 1.0:
            for key in SHAPES:
                torch.testing.assert_close(clipped[key], delta[key])
        else:
            assert global_norm(clipped) == pytest.approx(1.0, rel=1e-12)
    zero = OrderedDict(w=torch.zeros(3))
    assert clip_delta(zero, 1.0)[1] == 0.0


def test_fixed_mode_noise_std_is_sigma_c_over_m() -> None:
    sigma, clip, m = 2.0, 0.5, 4
    dp = ServerSideDp(ServerDpConfig("fixed", noise_multiplier=sigma, clip_norm=clip))
    deltas = [OrderedDict(w=torch.zeros(200_000)) for _ in range(m)]
    mean, record = dp.aggregate(deltas, None, torch.Generator().manual_seed(0))
    expected = sigma * clip / m
    assert record["noise_stddev"] == pytest.approx(expected)
    assert mean["w"].double().std().item() == pytest.approx(expected, rel=0.01)
    assert abs(mean["w"].double().mean().item()) < 5 * expected / math.sqrt(200_000)
    assert record["next_clip_norm"] == clip  # fixed mode keeps C


def test_fixed_mode_averages_clipped_deltas() -> None:
    deltas = _random_updates(5, seed=6, dtype=torch.float64)
    dp = ServerSideDp(ServerDpConfig("fixed", noise_multiplier=1e-9, clip_norm=2.0))
    mean, record = dp.aggregate(deltas, [3.0] * 5, torch.Generator().manual_seed(1))
    clipped = [clip_delta(d, 2.0)[0] for d in deltas]
    for key in SHAPES:
        expected = np.mean(_stack(clipped, key), axis=0)
        np.testing.assert_allclose(mean[key].numpy(), expected, atol=1e-7)
    assert set(record) >= {"clip_norm", "noise_stddev", "cohort_size"}
    assert not any("norms" in key for key in record)  # only public or noised values


def test_fixed_mode_refuses_unequal_weights() -> None:
    dp = ServerSideDp(ServerDpConfig("fixed", noise_multiplier=1.0, clip_norm=1.0))
    with pytest.raises(ValueError, match="equal weights"):
        dp.aggregate(_random_updates(3, seed=7), [1.0, 2.0, 1.0], torch.Generator())


def test_off_mode_is_the_plain_weighted_mean() -> None:
    deltas = _random_updates(3, seed=8)
    mean, record = ServerSideDp(ServerDpConfig()).aggregate(deltas, [1.0, 2.0, 3.0])
    expected = weighted_mean(deltas, [1.0, 2.0, 3.0])
    for key in SHAPES:
        torch.testing.assert_close(mean[key], expected[key])
    assert record["mode"] == "off"


@pytest.mark.parametrize("initial", [0.05, 80.0])
def test_adaptive_clip_norm_moves_to_the_target_quantile(initial: float) -> None:
    m = 201
    generator = torch.Generator().manual_seed(9)
    norms = torch.linspace(1.0, 5.0, m)
    directions = torch.randn(m, 8, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    deltas = [OrderedDict(w=d * r) for d, r in zip(directions, norms, strict=True)]
    config = ServerDpConfig(
        "adaptive",
        noise_multiplier=1.0,
        clip_norm=initial,
        target_quantile=0.5,
        clip_learning_rate=0.5,
        clipped_count_stddev=2.0,
    )
    dp = ServerSideDp(config)
    for _ in range(60):
        _, record = dp.aggregate(deltas, None, generator)
    assert dp.clip_norm == pytest.approx(float(norms.median()), rel=0.1)
    # The count's noise is paid for by raising the update noise: σ_Δ⁻² + (2σ_b)⁻² = σ⁻².
    sigma_update = record["update_noise_multiplier"]
    assert sigma_update**-2 + (2 * 2.0) ** -2 == pytest.approx(1.0)
    assert record["noise_stddev"] == pytest.approx(sigma_update * record["clip_norm"] / m)


def test_adaptive_resumes_from_a_recorded_clip_norm() -> None:
    config = ServerDpConfig("adaptive", noise_multiplier=1.0, clip_norm=0.1)
    assert ServerSideDp(config, clip_norm=3.5).clip_norm == 3.5


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        ServerDpConfig("sometimes", 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise_multiplier"):
        ServerDpConfig("fixed", 0.0, 1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        ServerDpConfig("adaptive", 1.0, -1.0)
    with pytest.raises(ValueError, match="target_quantile"):
        ServerDpConfig("adaptive", 1.0, 1.0, target_quantile=1.5)


def _pld_epsilon(event: dp_accounting.DpEvent, rounds: int, delta: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=1e-4)
    return accountant.compose(event, rounds).get_epsilon(delta)


def test_amplification_only_for_uniform_poisson_selection() -> None:
    config = ServerDpConfig("fixed", noise_multiplier=1.2, clip_norm=1.0)
    rounds, delta = 50, 1e-5
    amplified = server_dp_event(config, 10, 100, uniform_poisson_selection=True)
    # A fixed-size uniform cohort of 10 out of 100: no amplification, and a removed hospital's
    # place goes to another one, sensitivity 2C, i.e. a sensitivity-1 Gaussian with σ/2.
    plain = server_dp_event(
        config, 10, 100, uniform_poisson_selection=False, data_dependent_selection=False
    )
    assert amplified == dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2))
    assert plain == dp_accounting.GaussianDpEvent(0.6)

    independent_amplified = _pld_epsilon(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2)),
        rounds,
        delta,
    )
    independent_plain = _pld_epsilon(dp_accounting.GaussianDpEvent(0.6), rounds, delta)
    assert _pld_epsilon(amplified, rounds, delta) == pytest.approx(independent_amplified)
    assert _pld_epsilon(plain, rounds, delta) == pytest.approx(independent_plain)
    assert independent_plain > 2 * independent_amplified

    adaptive = ServerDpConfig("adaptive", noise_multiplier=1.2, clip_norm=1.0)
    # count noise is inside σ, and the count's sensitivity doubles with the update's
    assert server_dp_event(adaptive, 10, 100, False, data_dependent_selection=False) == plain
    # chosen from the data (the default), removing one hospital can reshuffle the cohort
    data_driven = server_dp_event(config, 10, 100, False)
    assert data_driven == dp_accounting.GaussianDpEvent(1.2 / 20)
    off = server_dp_event(ServerDpConfig(), 10, 100, True)
    assert isinstance(off, dp_accounting.NonPrivateDpEvent)
    with pytest.raises(ValueError, match="num_hospitals"):
        server_dp_event(config, 10, 5, True)
