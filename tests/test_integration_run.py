"""A real federation: `fedllm run` starts a Flower SuperLink in simulation mode, runs 2 rounds
of DP-SGD at 2 hospitals, and stops everything; the report must say exactly what happened."""

from __future__ import annotations

import json

import dp_accounting
import pytest
import yaml
from federation_helpers import TINY_TEST_MODEL, flower_processes, run_cli, run_experiment
from test_release_inventory import documented_inventory

from fedllm.report.progress import ROUND_EVENT, progress_event

pytestmark = pytest.mark.integration

CONFIG = {
    "run": {"name": "it", "seed": 3, "rounds": 2},
    "federation": {
        "num_hospitals": 2,
        "cohort_size": 2,
        "hospitals": [
            {"name": "north", "data_size": 80, "specialty_mix": {"cardiology": 1.0}},
            {"name": "south", "data_size": 60, "specialty_mix": {"oncology": 1.0}},
        ],
    },
    "model": TINY_TEST_MODEL,
    "training": {"local_steps": 3, "batch_size": 8, "learning_rate": 0.01},
    "privacy": {"target_epsilon": 4.0, "delta": 1e-5, "accountant": "pld"},
    "evaluation": {"baselines": ["centralized"], "max_eval_sequences": 32},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("integration")
    config = {**CONFIG, "run": {**CONFIG["run"], "publish_adapter_dir": "published"}}
    run_dir, report = run_experiment(root, config)
    return run_dir, report, root


def test_report_records_rounds_and_privacy(finished_run):
    run_dir, printed, _ = finished_run
    report = json.loads((run_dir / "report.json").read_text())
    assert printed["status"] == report["status"] == "completed"
    assert [row["round"] for row in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        assert sorted(row["selected"]) == ["north", "south"]
        assert set(row["epsilon"]) == {"north", "south"}
        assert row["perplexity"] >= 1.0  # a noised, clamped DP evaluation
        assert row["duration_s"] > 0
        assert "train_loss" not in row  # the exact training loss never leaves a hospital
    privacy = report["privacy"]
    assert privacy["delta"] == 1e-5
    assert privacy["accountant"] == "pld"
    assert privacy["neighbouring"] == "replace-one"
    assert privacy["unit"] == "patient"
    assert privacy["ledger_scope"] == "run"
    assert report["evaluation"]["release"] == "dp"
    assert report["evaluation"]["simulation_only"] is False
    for state in privacy["hospitals"].values():
        assert state["steps"] == 6
        assert state["rounds_participated"] == 2
        assert state["epsilon"] <= state["epsilon_cap"] == 4.0
        # ε re-derived by dp_accounting directly from what the report says happened: the
        # DP-SGD steps and a noised evaluation before round 1 and after each round
        steps = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                state["sample_rate"], dp_accounting.GaussianDpEvent(state["noise_multiplier"])
            ),
            state["steps"],
        )
        evaluations = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(10.0), 3)
        accountant = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
        reference = accountant.compose(
            dp_accounting.ComposedDpEvent([steps, evaluations])
        ).get_epsilon(1e-5)
        assert state["epsilon"] == pytest.approx(reference, rel=1e-2)
    eps_by_round = [row["epsilon"]["north"] for row in report["rounds"]]
    assert eps_by_round[0] < eps_by_round[1]


def test_outputs_baseline_and_checkpoint(finished_run):
    run_dir, report, _ = finished_run
    assert (run_dir / "perplexity.png").stat().st_size > 1000
    assert (run_dir / "epsilon.png").stat().st_size > 1000
    assert (run_dir / "checkpoint" / "adapter_config.json").is_file()
    # the final adapter is also published where inference servers watch, byte for byte
    published = run_dir.parent / "published"
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["published_adapter"] == str(published)
    for file in (run_dir / "checkpoint").iterdir():
        assert (published / file.name).read_bytes() == file.read_bytes()
    # with the DP record inference servers require, stating the report's guarantee
    record = json.loads((published / "dp-record.json").read_text())
    assert record["run_id"] == run_dir.name
    assert record["privacy_enabled"] is True
    assert {n: h["epsilon"] for n, h in record["hospitals"].items()} == {
        n: h["epsilon"] for n, h in saved["privacy"]["hospitals"].items()
    }
    assert report["baselines"]["centralized"]["perplexity"] > 1.0
    assert report["comparison"]["perplexity_over_centralized"] > 0
    # report.json is the ServerApp's alone: what the CLI adds is in summary.json beside it
    assert not {"baselines", "comparison"} & set(saved)
    assert "cli_phases" not in saved["timing"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["baselines"] == report["baselines"]
    assert summary["comparison"] == report["comparison"]
    assert summary["cli_phases"] == report["timing"]["cli_phases"]
    assert (run_dir / "comparison.png").stat().st_size > 1000
    # the progress the CLI showed came from the ServerApp's events in `flwr run`'s output
    lines = (run_dir / "flower.log").read_text().splitlines()
    events = [event for event in map(progress_event, lines) if event is not None]
    assert [event["round"] for event in events if event["event"] == ROUND_EVENT] == [1, 2]
    # DP evaluations of a few held-out patients are mostly noise; the server clamps each
    # hospital's noised mean clipped loss to [0, L] (post-processing), so perplexities stay
    # within [1, e^L] (L = evaluation.loss_clip = 8)
    for figures in (report["initial"], report["final"]):
        assert 1.0 <= figures["perplexity"] <= 2981.0


def test_hospital_ledgers_persist_on_disk(finished_run):
    run_dir, report, _ = finished_run
    from fedllm.privacy.node_ledger import NodePrivacyLedger

    for name, state in report["privacy"]["hospitals"].items():
        ledger = NodePrivacyLedger(
            f"sqlite:///{run_dir / 'hospitals' / name / 'ledger.db'}",
            name,
            epsilon_cap=4.0,
            delta=1e-5,
        )
        assert ledger.spent_epsilon() == pytest.approx(state["epsilon"], rel=1e-9)
        assert ledger.total_steps() == 6


def test_every_reply_key_the_server_received_is_in_the_release_inventory(finished_run):
    run_dir, _, _ = finished_run
    observed = json.loads((run_dir / "report.json").read_text())["releases"]
    documented = {(m, f"{r}.{k}") for m, r, k, _ in documented_inventory()}
    received = {(message, key) for message, keys in observed.items() for key in keys}
    assert received - documented == set()
    # the DP releases really went through the federation
    assert {("train", "arrays.*"), ("evaluate", "metrics.eval-loss-sum")} <= received


def test_nothing_left_running(finished_run):
    _, _, root = finished_run
    assert flower_processes(root) == set()


def _run_with_hospitals(root, name: str, hospitals: list[dict]):
    """``fedllm run`` a one-round experiment with these hospitals; its result and report."""
    config = {
        **CONFIG,
        "run": {"name": name, "seed": 3, "rounds": 1, "output_dir": str(root / "runs")},
        "federation": {"num_hospitals": len(hospitals), "cohort_size": len(hospitals)},
        "evaluation": {"baselines": [], "release": "off"},
    }
    config["federation"]["hospitals"] = hospitals
    config_file = root / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(config))
    result = run_cli(root, "run", str(config_file))
    assert "Traceback" not in result.stderr
    assert flower_processes(root) == set()
    return result, json.loads((root / "runs" / name / "report.json").read_text())


def test_a_hospital_that_cannot_start_stops_the_run_before_round_1(tmp_path_factory):
    """A sweep must see it: non-zero exit, status failed, the hospital and the cause; and
    the hospital that could start was not charged for a run that could not be the one asked."""
    hospitals = [
        {"name": "north", "data_size": 80, "specialty_mix": {"cardiology": 1.0}},
        # one record is one patient: it cannot be split into training and held-out
        {"name": "tiny", "data_size": 1, "specialty_mix": {"oncology": 1.0}},
    ]
    result, report = _run_with_hospitals(tmp_path_factory.mktemp("degraded"), "broken", hospitals)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "1 hospital(s) failed their checks before round 1" in result.stderr
    assert "hospital tiny: DataError: splitting 1 patient(s)" in result.stderr
    assert report["status"] == "failed"
    assert any(c.startswith("hospital tiny: DataError") for c in report["causes"])
    assert report["rounds"] == []


def test_a_run_in_which_no_hospital_can_start_fails_naming_each(tmp_path_factory):
    hospitals = [{"name": name, "data_size": 1} for name in ("east", "west")]
    result, report = _run_with_hospitals(tmp_path_factory.mktemp("failed"), "nothing", hospitals)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "2 hospital(s) failed their checks before round 1" in result.stderr
    for name in ("east", "west"):
        assert f"hospital {name}: DataError" in result.stderr
    assert report["status"] == "failed"
