"""Budgets live as long as the data: file-backed hospitals compose across runs, per dataset."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from typer.testing import CliRunner

from fedllm.cli.app import app
from fedllm.config import validate_config
from fedllm.federation.hospital import HospitalSite
from fedllm.federation.hospital_data import shared_dataset_identity
from fedllm.federation.hospital_state import LedgerLocationError, load_or_create_key
from fedllm.federation.node_settings import node_settings
from fedllm.models.adapters import adapter_state


def _records(path, patients: int = 60) -> str:
    rows = [
        {"text": f"note {n} of patient {p} about chest pain", "pid": f"p{p}", "dept": "cardiology"}
        for p in range(patients)
        for n in range(2)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _config(model_dir: str, data_path: str, ledger_dir: str, **data):
    return validate_config(
        {
            "run": {"rounds": 2, "seed": 5},
            "federation": {"num_hospitals": 2, "cohort_size": 2},
            "model": {"name": model_dir, "max_seq_length": 16},
            "data": {
                "source": "jsonl",
                "path": data_path,
                "patient_field": "pid",
                "specialty_field": "dept",
                "partition": "iid",
                **data,
            },
            "training": {"local_steps": 1, "batch_size": 4},
            "privacy": {"target_epsilon": 4.0, "ledger_dir": ledger_dir},
            "evaluation": {"baselines": [], "release": "off"},
        }
    )


def _site(config, run_dir) -> HospitalSite:
    settings = node_settings(config, {"partition-id": 0}, str(run_dir))
    return HospitalSite(config, settings.index, settings.ledger_url, split_key=settings.split_key)


def test_repeated_runs_on_one_file_compose_in_one_ledger(local_model_dir, tmp_path):
    data = _records(tmp_path / "notes.jsonl")
    config = _config(local_model_dir, data, str(tmp_path / "ledgers"))
    first = _site(config, tmp_path / "run-1")
    first.train_round(adapter_state(first.model), server_round=1, run_id="run-1")
    spent = first.ledger.spent_epsilon()
    assert spent > 0
    # a second run (another run directory, another name) on the same records: same ledger
    copy = tmp_path / "elsewhere.jsonl"
    copy.write_bytes((tmp_path / "notes.jsonl").read_bytes())
    again = _site(_config(local_model_dir, str(copy), str(tmp_path / "ledgers")), tmp_path / "r2")
    assert again.ledger.spent_epsilon() == pytest.approx(spent)
    assert again.train_data.input_ids.equal(first.train_data.input_ids)  # same key, same split
    dataset_dir = tmp_path / "ledgers" / shared_dataset_identity(config)
    assert (dataset_dir / "hospital-0" / "ledger.db").is_file()
    assert (dataset_dir / "hospital-0" / "split.key").stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "run-1" / "hospitals").exists()


def test_other_records_get_their_own_ledger(local_model_dir, tmp_path):
    ledgers = str(tmp_path / "ledgers")
    one = _config(local_model_dir, _records(tmp_path / "a.jsonl", 60), ledgers)
    other = _config(local_model_dir, _records(tmp_path / "b.jsonl", 61), ledgers)
    assert shared_dataset_identity(one) != shared_dataset_identity(other)


def test_a_changed_partitioning_of_the_same_records_is_refused(local_model_dir, tmp_path):
    data = _records(tmp_path / "notes.jsonl")
    ledgers = str(tmp_path / "ledgers")
    _site(_config(local_model_dir, data, ledgers), tmp_path / "run-1")
    moved = _config(local_model_dir, data, ledgers, partition="dirichlet")
    with pytest.raises(LedgerLocationError, match="partition"):
        _site(moved, tmp_path / "run-2")


def test_synthetic_hospitals_start_fresh_in_the_run_directory(local_model_dir, tmp_path):
    config = validate_config(
        {
            "federation": {"num_hospitals": 2, "cohort_size": 2},
            "model": {"name": local_model_dir, "max_seq_length": 16},
            "privacy": {"ledger_dir": str(tmp_path / "ledgers")},
        }
    )
    settings = node_settings(config, {"partition-id": 1}, str(tmp_path / "run"))
    assert settings.ledger_scope == "run"
    assert (
        settings.ledger_url
        == f"sqlite:///{tmp_path / 'run' / 'hospitals' / 'hospital-1' / 'ledger.db'}"
    )
    assert not (tmp_path / "ledgers").exists()


def test_fedllm_run_refuses_a_changed_partitioning_before_anything_starts(
    local_model_dir, tmp_path
):
    data = _records(tmp_path / "notes.jsonl")
    ledgers = str(tmp_path / "ledgers")
    _site(_config(local_model_dir, data, ledgers), tmp_path / "run-1")
    moved = _config(local_model_dir, data, ledgers, partition="dirichlet").model_dump(mode="json")
    moved["run"]["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "moved.yaml"
    path.write_text(yaml.safe_dump(moved))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "partition" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_an_unusable_ledger_dir_is_a_one_line_error(local_model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = _config(local_model_dir, _records(tmp_path / "notes.jsonl"), str(blocker / "sub"))
    raw = config.model_dump(mode="json")
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: privacy.ledger_dir")
    assert "Traceback" not in result.output


def test_racing_processes_agree_on_one_split_key(tmp_path):
    path = tmp_path / "state" / "split.key"
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: load_or_create_key(path), range(16)))
    assert len(keys) == 1
    assert len(next(iter(keys))) == 32
    assert sorted(p.name for p in path.parent.iterdir()) == ["split.key"]  # no staging left
