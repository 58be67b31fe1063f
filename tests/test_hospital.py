"""A hospital node without Flower: plan, charge the ledger, train, refuse past the cap."""

from __future__ import annotations

import pytest

from fedllm.config import validate_config
from fedllm.federation.hospital import EvaluationRefusedError, HospitalSite, score_evaluation
from fedllm.federation.hospital_data import LocalDataSource
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
    """σ is calibrated so that every planned release (rounds and DP evaluations) meets ε."""
    config = _config(local_model_dir, target_epsilon=3.0, delta=1e-5)
    site = HospitalSite(config, 1, f"sqlite:///{tmp_path / 'ledger.db'}")
    plan = site.plan
    assert plan.planned_rounds == 3
    assert plan.evaluations == 4  # before round 1 and after each round
    total = plan.epsilon_after(3)
    assert 2.9 < total <= 3.0
    steps_only = compute_epsilon(
        [SampledGaussianSteps(plan.noise_multiplier, plan.sample_rate, 3 * plan.steps_per_round)],
        1e-5,
    )
    assert steps_only < total  # the evaluations are paid from the same budget
    assert site.evaluate(adapter_state(site.model), 0, "r") is not None
    for round_id in (1, 2, 3):
        outcome = site.train_round(adapter_state(site.model), server_round=round_id, run_id="r")
        assert site.evaluate(outcome.adapter, round_id, "r") is not None
    assert site.ledger.spent_epsilon() == pytest.approx(total, rel=1e-6)
    assert site.status()["can-afford"] == 0
    purposes = [row["event"].get("purpose") for row in site.ledger.history()]
    assert purposes.count("evaluation") == 4


def test_non_private_site_has_no_ledger(local_model_dir, tmp_path):
    site = HospitalSite(_config(local_model_dir, enabled=False), 0, "sqlite://")
    outcome = site.train_round(adapter_state(site.model), server_round=1, run_id="r")
    assert site.ledger is None
    assert "epsilon" not in outcome.metrics
    assert outcome.metrics["num-examples"] == len(site.train_data)
    result, charged = site.evaluate(outcome.adapter, 1, "r")
    assert result.count == len(site.eval_data)
    assert charged == []


def test_train_reply_carries_no_exact_loss_or_timing(local_model_dir, tmp_path):
    site = HospitalSite(_config(local_model_dir), 0, f"sqlite:///{tmp_path / 'ledger.db'}")
    outcome = site.train_round(adapter_state(site.model), server_round=1, run_id="r")
    assert not {"train-loss", "train-seconds"} & set(outcome.metrics)


def test_dp_evaluation_is_noised_charged_and_bounded_per_unit(local_model_dir, tmp_path):
    config = _config(local_model_dir, target_epsilon=8.0)
    site = HospitalSite(config, 0, f"sqlite:///{tmp_path / 'ledger.db'}")
    adapter = adapter_state(site.model)
    exact = score_evaluation(site.model, site.eval_data, config)
    assert exact.loss_sum <= config.evaluation.loss_clip * exact.count
    released = [site.evaluate(adapter, 0, f"run-{i}") for i in range(4)]
    draws = [result.loss_sum for result, _ in released]
    assert all(
        events
        == [
            {
                "kind": "gaussian_release",
                "noise_multiplier": 10.0,
                "count": 1,
                "purpose": "evaluation",
            }
        ]
        for _, events in released
    )
    assert len(set(draws)) == 4  # fresh noise every release
    std = config.evaluation.noise_multiplier * config.evaluation.loss_clip
    assert all(abs(d - exact.loss_sum) < 6 * std for d in draws)
    assert sum(abs(d - exact.loss_sum) for d in draws) > 0.1 * std
    assert len(site.ledger.history()) == 4


def test_evaluation_off_or_refused(local_model_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    config = _config(local_model_dir)
    site = HospitalSite(config, 0, url, evaluation_allowed=False)
    assert site.evaluate(adapter_state(site.model), 0, "r") is None
    assert site.ledger.history() == []
    off = config.model_copy(
        update={"evaluation": config.evaluation.model_copy(update={"release": "off"})}
    )
    assert HospitalSite(off, 0, url).evaluate(adapter_state(site.model), 0, "r") is None
    exact = config.model_copy(
        update={"evaluation": config.evaluation.model_copy(update={"release": "exact"})}
    )
    records = tmp_path / "own.jsonl"
    records.write_text(
        "".join(f'{{"text": "note {i} about a patient", "pid": "p{i}"}}\n' for i in range(40))
    )
    own = LocalDataSource(str(records), "jsonl", patient_field="pid")
    deployed = HospitalSite(exact, 0, url, local_data=own, split_key=bytes(32))
    with pytest.raises(EvaluationRefusedError, match="simulation"):
        deployed.evaluate(adapter_state(deployed.model), 0, "r")


def test_the_next_status_projection_is_composed_ahead_after_a_charge(local_model_dir, tmp_path):
    """After its round's charge the site composes what the next status query projects, in the
    background; the query then reads that ε instead of composing it on the round's path."""
    import threading

    from fedllm.privacy import accountant

    site = HospitalSite(
        _config(local_model_dir, target_epsilon=None, noise_multiplier=1.0),
        0,
        f"sqlite:///{tmp_path / 'ledger.db'}",
    )
    adapter = adapter_state(site.model)
    site.train_round(adapter, server_round=1, run_id="r")
    assert site.evaluate(adapter, server_round=1, run_id="r") is not None  # the last charge
    for thread in threading.enumerate():
        if thread.name == "epsilon-ahead":
            thread.join(timeout=60)
    before = accountant._epsilon.cache_info()
    status = site.status()
    after = accountant._epsilon.cache_info()
    assert after.misses == before.misses  # nothing composed on the query's path
    projected = compute_epsilon([*site.ledger.events(), *site.plan.round_events()], 1e-5)
    assert status["epsilon-next"] == pytest.approx(projected, rel=1e-6)
