"""The `fedllm` CLI as a user meets it: plans before training, one-line errors for mistakes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedllm.cli.app import app
from fedllm.privacy.accountant import MAX_LOSS_GRID_POINTS, compute_epsilon, loss_grid_points
from fedllm.privacy.events import GaussianRelease, SampledGaussianSteps
from fedllm.report.run_dir import allocate_run_dir

runner = CliRunner()
FEDLLM = str(Path(sys.executable).with_name("fedllm"))


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


def test_epsilon_refuses_a_schedule_no_accountant_could_finish():
    """σ = 0.01 at q = 0.5 over 1000 steps once ran 9 minutes at 9.6 GB before being killed."""
    args = "--noise-multiplier 0.01 --sample-rate 0.5 --steps 1000 --delta 1e-5"
    for accountant, neighbouring in (("pld", "replace-one"), ("prv", "add-remove")):
        options = ["--accountant", accountant, "--neighbouring", neighbouring]
        result = subprocess.run(
            [FEDLLM, "privacy", "epsilon", *shlex.split(args), *options],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert result.stdout == ""
        message = result.stderr.strip()
        assert "\n" not in message
        assert message.startswith("error: noise_multiplier 0.01 at sample_rate 0.5 over 1000")
        assert f"the {accountant} accountant computes up to" in message


def test_loss_grid_estimate_separates_cheap_from_runaway_schedules():
    readme = SampledGaussianSteps(1.1, 0.01, 1000)
    assert loss_grid_points(readme) < MAX_LOSS_GRID_POINTS / 10
    # measured: σ = 0.5 took 6 s and 0.8 GB; σ = 0.4 10 s and 1 GB; σ = 0.2 at q = 1 40 s, 3.9 GB
    assert loss_grid_points(SampledGaussianSteps(0.5, 0.5, 1000)) < MAX_LOSS_GRID_POINTS
    assert loss_grid_points(SampledGaussianSteps(0.4, 0.5, 1000)) > MAX_LOSS_GRID_POINTS
    assert loss_grid_points(SampledGaussianSteps(0.2, 1.0, 1000)) > MAX_LOSS_GRID_POINTS
    more_steps = [loss_grid_points(SampledGaussianSteps(1.0, 0.1, k)) for k in (10, 1000, 10**5)]
    assert more_steps == sorted(more_steps)
    assert loss_grid_points(SampledGaussianSteps(1e-9, 0.5, 1)) > MAX_LOSS_GRID_POINTS


def test_piped_tables_keep_their_width_and_columns_is_honoured(tmp_path):
    """Rich used to cut any output that is not a terminal at 80 columns."""
    db = f"sqlite:///{tmp_path / 'users.db'}"
    username, department = "u" * 60, "cardiology-and-interventional-cardiovascular-medicine"
    environment = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    add = [FEDLLM, "users", "add", username, "--role", "clinician", "--department", department]
    subprocess.run(
        [*add, "--password-stdin", "--db", db],
        input="correct horse battery\n",
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    def listing(env: dict[str, str]) -> list[str]:
        result = subprocess.run(
            [FEDLLM, "users", "list", "--db", db],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout.splitlines()

    piped = listing(environment)
    row = next(line for line in piped if username in line)
    assert department in row
    assert len(row) > 80
    assert all(len(line) <= 60 for line in listing({**environment, "COLUMNS": "60"}))


def test_a_hospital_name_with_a_dot_is_refused_at_validation(tmp_path):
    """report.json keys values by hospital name; JSON flatteners split keys on '.'."""
    hospitals = [{"name": "st.mary"}, {"name": "general_2"}]
    config = {"federation": {"num_hospitals": 2, "cohort_size": 1, "hospitals": hospitals}}
    result = runner.invoke(app, ["privacy", "plan", _write(tmp_path, config)])
    assert result.exit_code == 2
    assert "federation.hospitals.0.name: got 'st.mary'" in result.output
    assert "Traceback" not in result.output


def test_calibrate_refuses_a_target_only_unaccountable_noise_meets():
    """σ = 0.1 at q = 0.5 over 1000 steps is calibrate's floor, but its PLD never finished."""
    args = "--target-epsilon 10000 --sample-rate 0.5 --steps 1000 --delta 1e-5"
    result = subprocess.run(
        [FEDLLM, "privacy", "calibrate", *shlex.split(args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    message = result.stderr.strip()
    assert "\n" not in message
    assert message.startswith("error: target_epsilon 10000 at sample_rate 0.5 over 1000 steps")
    assert "choose a target below" in message


def test_readme_calibrate_command_as_written():
    command = ".venv/bin/fedllm privacy calibrate --target-epsilon 8 --sample-rate 0.05 --steps 600 --delta 1e-5"  # noqa: E501
    argv = shlex.split(command)
    result = subprocess.run(
        [FEDLLM, *argv[1:]], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.startswith("σ = 1.47787 gives ε = 7.99855 <= 8 at δ = 1e-05")
