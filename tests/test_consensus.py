"""GNMax consensus: its ε checked against dp_accounting, its decisions against their intent."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant

from fedllm.privacy import GaussianRelease, compute_epsilon
from fedllm.privacy.consensus import (
    VOTE_SENSITIVITY,
    ConsensusMechanism,
    TokenDecision,
    ledger_event,
    noise_for_epsilon,
    summarise,
)


def _reference_epsilon(vote_noise_std: float, max_tokens: int, delta: float) -> float:
    """max_tokens Gaussians of multiplier σ/√2, composed by dp_accounting's PLD directly."""
    token = dp_accounting.GaussianDpEvent(vote_noise_std / math.sqrt(2))
    answer = dp_accounting.ComposedDpEvent([token] * max_tokens)
    return PLDAccountant(value_discretization_interval=1e-4).compose(answer).get_epsilon(delta)


@pytest.mark.parametrize(
    ("sigma", "max_tokens", "delta"), [(40.0, 16, 1e-6), (100.0, 64, 1e-5), (8.0, 4, 1e-6)]
)
def test_epsilon_cost_matches_dp_accounting(sigma: float, max_tokens: int, delta: float) -> None:
    mechanism = ConsensusMechanism(sigma)
    pld = mechanism.epsilon_cost(max_tokens, delta)
    assert pld == pytest.approx(_reference_epsilon(sigma, max_tokens, delta), rel=1e-3)
    # k Gaussians of multiplier s are exactly one Gaussian of multiplier s/√k.
    analytic = dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(2 * max_tokens), delta)
    assert pld == pytest.approx(analytic, rel=1e-3)
    rdp = mechanism.epsilon_cost(max_tokens, delta, "rdp")
    assert pld <= rdp <= 1.2 * pld
    assert mechanism.epsilon_cost(max_tokens, delta) == pld  # cached value is the same value


def test_node_ledger_records_the_mechanism_the_router_costs() -> None:
    mechanism = ConsensusMechanism(30.0)
    assert math.sqrt(2) == VOTE_SENSITIVITY
    rebuilt = ConsensusMechanism.from_noise_multiplier(30.0 / math.sqrt(2))
    assert rebuilt.vote_noise_std == pytest.approx(30.0, rel=1e-15)
    per_token = compute_epsilon(
        [GaussianRelease(30.0 / math.sqrt(2))] * 32, 1e-6, neighbouring="add-remove"
    )
    assert per_token == pytest.approx(mechanism.epsilon_cost(32, 1e-6), rel=1e-3)
    # a hospital's ledger (replace-one) records the same mechanism in its own units
    recorded = ledger_event(mechanism.noise_multiplier, 32)
    assert recorded.purpose == "consensus"
    assert compute_epsilon([recorded], 1e-6) == pytest.approx(per_token, rel=1e-3)
    # Longer answers and less noise cost more.
    assert mechanism.epsilon_cost(64, 1e-6) > mechanism.epsilon_cost(32, 1e-6)
    assert ConsensusMechanism(15.0).epsilon_cost(32, 1e-6) > mechanism.epsilon_cost(32, 1e-6)


def test_pld_cost_is_the_closed_form_and_fast_for_small_noise() -> None:
    """PLD for σ = 4 and 2,048 tokens takes seconds; the charged value is the exact one."""
    mechanism = ConsensusMechanism(4.0)
    exact = dp_accounting.get_epsilon_gaussian(4.0 / math.sqrt(2 * 2048), 1e-5)
    assert mechanism.epsilon_cost(2048, 1e-5) == pytest.approx(exact, rel=1e-12)
    assert mechanism.epsilon_cost(2048, 1e-5, "prv") == pytest.approx(exact, rel=1e-12)


def _decide(
    mechanism: ConsensusMechanism, votes: list[int], n: int, rng: np.random.Generator
) -> TokenDecision:
    """Every voter casts its own noisy ballot; the router tallies them."""
    return mechanism.tally([mechanism.ballot(vote, n, rng) for vote in votes])


def test_a_ballot_is_the_vote_plus_gaussian_noise_of_the_configured_std() -> None:
    mechanism = ConsensusMechanism(3.0)
    rng = np.random.default_rng(5)
    ballots = np.array([mechanism.ballot(2, 4, rng) for _ in range(20_000)])
    assert ballots.mean(axis=0) == pytest.approx([0, 0, 1, 0], abs=0.07)
    assert ballots.std(axis=0) == pytest.approx([3.0] * 4, rel=0.03)
    assert abs(np.corrcoef(ballots[:, 0], ballots[:, 1])[0, 1]) < 0.03


def test_clear_majority_wins_with_little_noise() -> None:
    mechanism = ConsensusMechanism(0.2)
    rng = np.random.default_rng(0)
    votes = [2] * 7 + [0] * 3
    decisions = [_decide(mechanism, votes, 5, rng) for _ in range(300)]
    assert {d.index for d in decisions} == {2}
    assert all(d.confident for d in decisions)
    fractions = np.array([d.noisy_top_fraction for d in decisions])
    assert 0.6 < fractions.mean() < 0.8  # the noisy count of 7 out of 10 voters


def test_the_tally_carries_the_noise_of_every_ballot() -> None:
    """n hospitals noising their own ballots: the sum's noise has std σ√n (the utility cost)."""
    mechanism = ConsensusMechanism(2.0)
    rng = np.random.default_rng(6)
    totals = [
        np.sum([mechanism.ballot(0, 2, rng) for _ in range(9)], axis=0)[1] for _ in range(5000)
    ]
    assert np.std(totals) == pytest.approx(2.0 * 3, rel=0.05)


def test_huge_noise_makes_the_choice_uniform() -> None:
    mechanism = ConsensusMechanism(1e4)
    rng = np.random.default_rng(1)
    picks = [_decide(mechanism, [0, 0, 0, 0], 4, rng).index for _ in range(4000)]
    frequencies = np.bincount(picks, minlength=4) / len(picks)
    assert np.all(np.abs(frequencies - 0.25) < 0.04)


def test_threshold_decides_confidence_from_noisy_counts() -> None:
    rng = np.random.default_rng(2)
    split = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    lenient = ConsensusMechanism(0.03, threshold=0.3)
    strict = ConsensusMechanism(0.03, threshold=0.9)
    assert all(_decide(lenient, split, 3, rng).confident for _ in range(50))
    assert not any(_decide(strict, split, 3, rng).confident for _ in range(50))
    assert _decide(ConsensusMechanism(0.03, threshold=1.0), [1] * 5, 2, rng).index == 1
    noisy = ConsensusMechanism(50.0)
    fractions = [_decide(noisy, [0, 1, 1], 8, rng).noisy_top_fraction for _ in range(200)]
    assert min(fractions) >= 0.0
    assert max(fractions) == 1.0  # clipped: noisy counts far above the number of voters


def test_summarise() -> None:
    assert summarise([]) == (False, 0.0)
    sure = TokenDecision(0, 0.9, True)
    unsure = TokenDecision(1, 0.3, False)
    assert summarise([sure, sure]) == (True, pytest.approx(0.9))
    reached, score = summarise([sure, unsure])
    assert not reached
    assert score == pytest.approx(0.6)


@pytest.mark.parametrize(("epsilon", "max_tokens", "delta"), [(1.0, 32, 1e-6), (4.0, 8, 1e-5)])
def test_noise_for_epsilon_round_trips(epsilon: float, max_tokens: int, delta: float) -> None:
    sigma = noise_for_epsilon(epsilon, max_tokens, delta)
    assert ConsensusMechanism(sigma).epsilon_cost(max_tokens, delta) <= epsilon
    assert ConsensusMechanism(sigma * (1 - 2e-4)).epsilon_cost(max_tokens, delta) > epsilon
    rdp_sigma = noise_for_epsilon(epsilon, max_tokens, delta, "rdp")
    assert rdp_sigma > sigma  # the looser accountant needs more noise for the same ε
    assert ConsensusMechanism(rdp_sigma).epsilon_cost(max_tokens, delta, "rdp") <= epsilon


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vote_noise_std": 0.0}, "vote_noise_std"),
        ({"vote_noise_std": float("nan")}, "vote_noise_std"),
        ({"vote_noise_std": 1.0, "threshold": 0.0}, "threshold"),
        ({"vote_noise_std": 1.0, "threshold": 1.5}, "threshold"),
    ],
)
def test_invalid_mechanisms_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConsensusMechanism(**kwargs)


def test_invalid_inputs_are_rejected() -> None:
    mechanism = ConsensusMechanism(1.0)
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="candidate index"):
        mechanism.ballot(3, 3, rng)
    with pytest.raises(ValueError, match="candidate index"):
        mechanism.ballot(-1, 3, rng)
    with pytest.raises(ValueError, match="candidate index"):
        mechanism.ballot(True, 3, rng)
    with pytest.raises(ValueError, match="n_candidates"):
        mechanism.ballot(0, 0, rng)
    with pytest.raises(ValueError, match="at least one ballot"):
        mechanism.tally([])
    with pytest.raises(ValueError, match="differ in length"):
        mechanism.tally([[0.1, 0.2], [0.3]])
    with pytest.raises(ValueError, match="finite"):
        mechanism.tally([[0.1, float("nan")]])
    with pytest.raises(ValueError, match="max_tokens"):
        mechanism.epsilon_cost(0, 1e-6)
    with pytest.raises(ValueError, match="delta"):
        mechanism.epsilon_cost(8, 0.0)
    with pytest.raises(ValueError, match="accountant"):
        mechanism.epsilon_cost(8, 1e-6, "gaussian")
    with pytest.raises(ValueError, match="epsilon"):
        noise_for_epsilon(-1.0, 8, 1e-6)
