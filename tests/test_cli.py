"""The `fedllm` CLI as a user meets it: plans before training, one-line errors for mistakes."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fedllm.cli.app import app
from fedllm.privacy.accountant import compute_epsilon
from fedllm.privacy.events import GaussianRelease, SampledGaussianSteps
from fedllm.report.run_dir import allocate_run_dir

runner = CliRunner()


def _write(tmp_path, config) -> str:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_plan_reports_sigma_and_projected_epsilon_per_hospital(tmp_path):
    config = {
        "run": {"rounds": 4},
        "federation": {"num_hospitals": 2, "cohort_size": 1},
        "training": {"local_steps": 5, "batch_size": 10},
        "privacy": {"target_epsilon": 3.0, "delta": 1e-5, "planned_rounds": 2, "epsilon_cap": 5},
    }
    result = runner.invoke(app, ["privacy", "plan", _write(tmp_path, config), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["delta"] == 1e-5
    assert plan["neighbouring"] == "replace-one"
    assert plan["unit"] == "patient"
    assert len(plan["hospitals"]) == 2
    for row in plan["hospitals"]:
        assert row["planned_rounds"] == 2
        assert row["sample_rate"] == pytest.approx(10 / row["units"])
        assert row["epsilon_cap"] == 5
        steps = SampledGaussianSteps(row["noise_multiplier"], row["sample_rate"], 10)
        # cohort 1 of 2 with the default (quantum) selection: every round also releases a
        # noised loss statistic, the run starts with one noised profile release, and the
        # hospital releases a noised evaluation before round 1 and after each of the 4 rounds
        releases = [GaussianRelease(20.0, 2), GaussianRelease(20.0), GaussianRelease(10.0, 5)]
        reference = compute_epsilon([steps, *releases], 1e-5)
        assert row["projected_epsilon"] == pytest.approx(reference, rel=1e-6)
        assert compute_epsilon([steps], 1e-5) < reference
        assert 2.9 < row["projected_epsilon"] <= 3.0
        assert row["epsilon_per_round"] < row["projected_epsilon"]


def test_a_deployed_run_refuses_exact_evaluation_before_connecting():
    result = runner.invoke(app, ["run", "configs/default.yaml", "--federation", "anywhere"])
    assert result.exit_code == 2
    assert "evaluation.release: got 'exact'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "missing.yaml"], "config file not found"),
        (["privacy", "plan", "missing.yaml"], "config file not found"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, fragment):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_bad_key_in_run_config_names_it(tmp_path):
    path = _write(tmp_path, {"training": {"lr": 0.1}})
    result = runner.invoke(app, ["run", path])
    assert result.exit_code == 2
    assert "training.lr: unknown key" in result.output
    assert "Traceback" not in result.output


def test_bad_override_names_the_key(tmp_path):
    path = _write(tmp_path, {})
    result = runner.invoke(app, ["run", path, "--set", "privacy.delta=5"])
    assert result.exit_code == 2
    assert "privacy.delta: got 5" in result.output


def test_run_directories_are_never_reused(tmp_path):
    first = allocate_run_dir(tmp_path, "exp")
    (first / "report.json").write_text("{}")
    second = allocate_run_dir(tmp_path, "exp")
    third = allocate_run_dir(tmp_path, "exp")
    assert [first.name, second.name, third.name] == ["exp", "exp-2", "exp-3"]
    assert (first / "report.json").read_text() == "{}"
