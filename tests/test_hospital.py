"""A hospital node without Flower: plan, charge the ledger, train, refuse past the cap."""

from __future__ import annotations

import pytest

from fedllm.config import validate_config
from fedllm.federation.hospital import HospitalSite
from fedllm.models.adapters import adapter_state
from fedllm.privacy.accountant import compute_epsilon
from fedllm.privacy.events import SampledGaussianSteps
from fedllm.privacy.node_ledger import BudgetExceededError


def _config(model_dir: str, **privacy):
    return validate_config(
        {
            "run": {"rounds": 3, "seed": 1},
            "federation": {
                "num_hospitals": 2,
                "cohort_size": 2,
                "hospitals": [
                    {"name": "a", "data_size": 60, "specialty_mix": {"cardiology": 1}},
                    {"name": "b", "data_size": 50, "specialty_mix": {"oncology": 1}},
                ],
            },
            "model": {"name": model_dir, "max_seq_length": 32},
            "training": {"local_steps": 2, "batch_size": 8, "learning_rate": 0.01},
            "privacy": privacy,
            "evaluation": {"baselines": []},
        }
    )


def test_cap_refuses_a_round_and_survives_restart(local_model_dir, tmp_path):
    config = _config(local_model_dir, target_epsilon=None, noise_multiplier=1.0)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    probe = HospitalSite(config, 0, url)
    q, steps = probe.plan.sample_rate, probe.plan.steps_per_round
    one_round = compute_epsilon([SampledGaussianSteps(1.0, q, steps)], 1e-5)
    two_rounds = compute_epsilon([SampledGaussianSteps(1.0, q, 2 * steps)], 1e-5)
    cap = (one_round + two_rounds) / 2

    site = HospitalSite(config, 0, url, epsilon_cap=cap)
    assert site.status()["can-afford"] == 1
    outcome = site.train_round(adapter_state(site.model), server_round=1, run_id="r")
    assert outcome.metrics["epsilon"] == pytest.approx(one_round, rel=1e-6)
    assert outcome.metrics["steps"] == steps
    with pytest.raises(BudgetExceededError):
        site.train_round(adapter_state(site.model), server_round=2, run_id="r")

    restarted = HospitalSite(config, 0, url, epsilon_cap=cap)
    status = restarted.status()
    assert status["epsilon"] == pytest.approx(one_round, rel=1e-6)
    assert status["can-afford"] == 0
    assert status["epsilon-next"] == pytest.approx(two_rounds, rel=1e-6)
    assert restarted.ledger.rounds_participated() == 1


def test_calibrated_noise_lands_on_target_after_planned_rounds(local_model_dir, tmp_path):
    config = _config(local_model_dir, target_epsilon=3.0, delta=1e-5)
    site = HospitalSite(config, 1, f"sqlite:///{tmp_path / 'ledger.db'}")
    plan = site.plan
    assert plan.planned_rounds == 3
    total = compute_epsilon(
        [SampledGaussianSteps(plan.noise_multiplier, plan.sample_rate, 3 * plan.steps_per_round)],
        1e-5,
    )
    assert total <= 3.0
    assert total > 2.9
    for round_id in (1, 2, 3):
        site.train_round(adapter_state(site.model), server_round=round_id, run_id="r")
    assert site.ledger.spent_epsilon() == pytest.approx(total, rel=1e-6)
    assert site.status()["can-afford"] == 0


def test_non_private_site_has_no_ledger(local_model_dir, tmp_path):
    site = HospitalSite(_config(local_model_dir, enabled=False), 0, "sqlite://")
    outcome = site.train_round(adapter_state(site.model), server_round=1, run_id="r")
    assert site.ledger is None
    assert "epsilon" not in outcome.metrics
    assert outcome.metrics["num-examples"] == len(site.train_data)
    assert site.evaluate(outcome.adapter).tokens > 0
