"""Each selection mode through real Flower processes: budgets respected, ledgers agree."""

from __future__ import annotations

import pytest
from federation_helpers import TINY_TEST_MODEL, run_experiment

from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.privacy.server_ledger import ServerLedger

pytestmark = pytest.mark.integration

MODES = {
    "random": {"selection": "random", "aggregation": "weighted"},
    "oort": {"selection": "oort", "aggregation": "trimmed-mean", "trim_fraction": 0.25},
    "quantum": {"selection": "quantum", "aggregation": "inclusion-weighted"},
    "exact": {
        "selection": "exact",
        "aggregation": "weighted",
        "server_dp": {"mode": "fixed", "noise_multiplier": 0.5, "clip_norm": 0.5},
    },
}


def _config(strategy):
    return {
        "run": {"name": "sel", "seed": 4, "rounds": 2},
        "federation": {
            "num_hospitals": 4,
            "cohort_size": 2,
            "hospitals": [
                {"name": "a", "data_size": 70, "specialty_mix": {"cardiology": 1.0}},
                {"name": "b", "data_size": 60, "specialty_mix": {"cardiology": 1.0}},
                {"name": "c", "data_size": 60, "specialty_mix": {"oncology": 1.0}},
                # a cap below the cost of one round: never eligible, never selected
                {"name": "tight", "data_size": 60, "epsilon_cap": 0.05},
            ],
        },
        "model": TINY_TEST_MODEL,
        "training": {"local_steps": 2, "batch_size": 8, "learning_rate": 0.01},
        "privacy": {"target_epsilon": 5.0, "delta": 1e-5},
        "evaluation": {"baselines": [], "max_eval_sequences": 16},
        "strategy": strategy,
    }


@pytest.fixture(scope="module", params=list(MODES))
def mode_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"selection-{request.param}")
    run_dir, report = run_experiment(root, _config(MODES[request.param]))
    return request.param, run_dir, report


def test_cohorts_respect_eligibility_and_budgets(mode_run):
    mode, _, report = mode_run
    assert report["status"] == "completed"
    assert len(report["rounds"]) == 2
    for row in report["rounds"]:
        assert len(row["selected"]) == 2
        assert "tight" not in row["selected"]
        assert "cap" in row["ineligible"]["tight"]
        assert row["inclusion_probability"]["tight"] == 0.0
        assert sum(row["inclusion_probability"].values()) == pytest.approx(2.0)
        assert set(row["utility"]) == {"a", "b", "c"}
    for name, state in report["privacy"]["hospitals"].items():
        assert state["epsilon"] <= state["epsilon_cap"] + 1e-9, name
    if mode == "exact":
        assert all("server_dp" in row for row in report["rounds"])


def test_server_ledger_mirrors_hospital_ledgers(mode_run):
    _, run_dir, report = mode_run
    server = ServerLedger(f"sqlite:///{run_dir / 'server.db'}")
    assert server.last_completed_round(run_dir.name) == 2
    for name, state in report["privacy"]["hospitals"].items():
        hospital = NodePrivacyLedger(
            f"sqlite:///{run_dir / 'hospitals' / name / 'ledger.db'}",
            name,
            epsilon_cap=state["epsilon_cap"],
            delta=1e-5,
        )
        assert server.spent_epsilon(name, 1e-5) == pytest.approx(hospital.spent_epsilon(), rel=1e-9)
        assert hospital.spent_epsilon() == pytest.approx(state["epsilon"], rel=1e-9)
