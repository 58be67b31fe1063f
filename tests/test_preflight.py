"""Everything checkable without private data is checked before a single ε is spent.

Bad configs go through the real ``fedllm run`` CLI: each must stop with exit code 2 and one
line naming the key, before any Flower process starts, leaving no run directory and every
ledger byte for byte as it was. A deployed hospital's own checks run when the first message
of a run (a status query, which charges nothing) builds its site, and a hospital that fails
them stops the run before anything is released.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from fedllm.cli.app import app
from fedllm.clients.client_app import status as status_handler
from fedllm.config import validate_config
from fedllm.data import DataError
from fedllm.federation.experiment import APP_ROOT, EXPERIMENT, experiment_json
from fedllm.federation.hospital import HospitalSite
from fedllm.federation.hospital_data import LocalDataSource
from fedllm.federation.preflight import PreflightError, check_node_count, preflight
from fedllm.privacy.accountant import compute_epsilon
from fedllm.privacy.events import GaussianRelease
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.privacy.plan import UnreachableTargetError, unreachable_target
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.run_report import RunReport, read_report_json
from fedllm.strategies.contract import check_strategy_class
from fedllm.strategies.server_app import run_federation

runner = CliRunner()

BAD_STRATEGY_MODULE = """
from fedllm.strategies.privacy_aware import PrivacyAwareStrategy


class ForgetsTheRound(PrivacyAwareStrategy):
    def utility(self, view):
        return 1.0


class OldConstructor(PrivacyAwareStrategy):
    def __init__(self, config, report, run_context=None, ledger=None, round_offset=0):
        super().__init__(cohort_size=config.federation.cohort_size)
"""


def _base(tmp_path: Path) -> dict:
    """A small experiment whose outputs and persistent ledgers live under ``tmp_path``."""
    return {
        "run": {"name": "refused", "rounds": 2, "output_dir": str(tmp_path / "runs")},
        "federation": {
            "num_hospitals": 2,
            "cohort_size": 1,
            "hospitals": [{"name": "a"}, {"name": "b"}],
        },
        "training": {"local_steps": 1, "batch_size": 4},
        "privacy": {"ledger_dir": str(tmp_path / "ledgers")},
        "evaluation": {"baselines": [], "release": "off"},
    }


def _merge(base: dict, changes: dict) -> dict:
    merged = {**base}
    for section, values in changes.items():
        merged[section] = {**base.get(section, {}), **values}
    return merged


def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _records(count: int) -> list[str]:
    return [
        json.dumps({"text": f"note {i} about chest pain", "pid": f"p{i}"}) for i in range(count)
    ]


def _data_files(tmp_path: Path) -> None:
    """The records files the bad configs name: good, malformed, and too small for two."""
    _jsonl(tmp_path / "notes.jsonl", _records(30))
    _jsonl(tmp_path / "broken.jsonl", [*_records(3), "{not json", *_records(2)])
    _jsonl(tmp_path / "one.jsonl", _records(1))


def _bad_configs(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    """One bad config per check: (changes to the base config, the key the error must name)."""
    good, broken = str(tmp_path / "notes.jsonl"), str(tmp_path / "broken.jsonl")
    tiny = str(tmp_path / "one.jsonl")
    return {
        "solver typo": ({"strategy": {"solver": "qaoa"}}, "strategy.solver"),
        "solver option": (
            {"strategy": {"solver_options": {"temperature_ladder": 3}}},
            "strategy.solver_options",
        ),
        "strategy not importable": (
            {"strategy": {"strategy_class": "no_such_package.strategy:Mine"}},
            "strategy.strategy_class",
        ),
        "strategy not a subclass": (
            {"strategy": {"strategy_class": "fedllm.config:ExperimentConfig"}},
            "strategy.strategy_class",
        ),
        "strategy hook signature": (
            {"strategy": {"strategy_class": "bad_strategy:ForgetsTheRound"}},
            "strategy.strategy_class",
        ),
        "strategy constructor": (
            {"strategy": {"strategy_class": "bad_strategy:OldConstructor"}},
            "strategy.strategy_class",
        ),
        "LoRA targets": (
            {"model": {"lora": {"target_modules": ["q_proj"]}}},
            "model.lora.target_modules",
        ),
        "unknown model": ({"model": {"name": "no-such-org/no-such-model"}}, "model.name"),
        "missing data": (
            {"data": {"source": "jsonl", "path": str(tmp_path / "missing.jsonl")}},
            "data.path",
        ),
        "malformed data": ({"data": {"source": "jsonl", "path": broken}}, "data.path"),
        "wrong column": (
            {"data": {"source": "jsonl", "path": good, "text_field": "note"}},
            "data.text_field",
        ),
        "a hospital without records": (
            {"data": {"source": "jsonl", "path": tiny, "partition": "iid"}},
            "data.path",
        ),
        "unreachable target": ({"privacy": {"target_epsilon": 0.05}}, "privacy.target_epsilon"),
        "file data, solver typo": (
            {"data": {"source": "jsonl", "path": good}, "strategy": {"solver": "qaoa"}},
            "strategy.solver",
        ),
    }


def _write_config(tmp_path: Path, changes: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(_merge(_base(tmp_path), changes)), encoding="utf-8")
    return path


def _existing_ledgers(tmp_path: Path) -> dict[str, tuple[bytes, int]]:
    """A dataset's ledgers from earlier runs, which a refused run must leave untouched."""
    ledger = tmp_path / "ledgers" / "earlier-dataset" / "a" / "ledger.db"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"charged by an earlier run")
    return _snapshot(tmp_path / "ledgers")


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


CASES = list(_bad_configs(Path()))


@pytest.mark.parametrize("case", CASES)
def test_bad_config_is_refused_before_anything_starts(case, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "bad_strategy.py").write_text(BAD_STRATEGY_MODULE, encoding="utf-8")
    _data_files(tmp_path)
    changes, key = _bad_configs(tmp_path)[case]
    config = _write_config(tmp_path, changes)
    ledgers = _existing_ledgers(tmp_path)
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {key}"), lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()
    assert _snapshot(tmp_path / "ledgers") == ledgers


@pytest.mark.parametrize(
    "case", ["solver typo", "missing data", "unreachable target", "LoRA targets"]
)
def test_the_installed_cli_refuses_in_a_fresh_process(case, tmp_path):
    _data_files(tmp_path)
    changes, key = _bad_configs(tmp_path)[case]
    config = _write_config(tmp_path, changes)
    ledgers = _existing_ledgers(tmp_path)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "fedllm"), "run", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {key}"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists()
    assert _snapshot(tmp_path / "ledgers") == ledgers


def test_a_valid_experiment_passes_every_check(tmp_path, local_model_dir):
    notes = _jsonl(tmp_path / "notes.jsonl", _records(30))
    config = validate_config(
        _merge(
            _base(tmp_path),
            {
                "model": {"name": local_model_dir, "lora": {"target_modules": ["c_attn"]}},
                "data": {"source": "jsonl", "path": notes, "patient_field": "pid"},
                "strategy": {
                    "strategy_class": "examples.custom_strategy:FairnessFirstStrategy",
                    "solver": "sa-swap",
                    "solver_options": {"chains": 4},
                },
                "evaluation": {"release": "dp"},
            },
        )
    )
    assert preflight(config, simulation=True) == config
    check_strategy_class(config.strategy.strategy_class, APP_ROOT)
    assert not (tmp_path / "ledgers").exists()


def test_preflight_records_the_lora_modules_peft_picks(tmp_path):
    """`target_modules: null` comes back as what peft adapts, so the run directory says it."""
    config = validate_config(_base(tmp_path))
    assert config.model.lora.target_modules is None
    resolved = preflight(config, simulation=True)
    assert resolved.model.lora.target_modules == ["c_attn"]
    assert resolved.model_copy(update={"model": config.model}) == config


def test_unreachable_target_names_the_releases_and_their_cost(tmp_path):
    config = validate_config(_merge(_base(tmp_path), {"privacy": {"target_epsilon": 0.05}}))
    # cohort 1 of 2 under quantum selection: a noised loss statistic in each of the 2 rounds
    # and one noised profile, whatever σ DP-SGD uses
    cost = compute_epsilon([GaussianRelease(20.0, 2), GaussianRelease(20.0)], 1e-5)
    assert cost > 0.05
    reason = unreachable_target(config)
    assert reason is not None
    assert reason.startswith(
        f"the selection-statistic releases alone cost ε={cost:.3g} >= target 0.05"
    )
    assert "strategy.utility_noise_multiplier=20" in reason
    reachable = config.model_copy(
        update={"privacy": config.privacy.model_copy(update={"target_epsilon": cost * 1.01})}
    )
    assert unreachable_target(reachable) is None


def test_privacy_plan_names_the_hospital_and_the_cause(tmp_path):
    config = _write_config(tmp_path, {"privacy": {"target_epsilon": 0.05}})
    result = runner.invoke(app, ["privacy", "plan", str(config)])
    assert result.exit_code == 2
    assert "hospital a: the selection-statistic releases alone cost ε=" in result.output
    assert "Traceback" not in result.output


def _site_config(tmp_path: Path, model_dir: str, **changes) -> object:
    base = _merge(_base(tmp_path), {"model": {"name": model_dir}})
    return validate_config(_merge(base, changes))


@pytest.mark.parametrize(
    ("changes", "own_records", "error", "message"),
    [
        (
            {"model": {"lora": {"target_modules": ["q_proj"]}}},
            False,
            PreflightError,
            "model.lora.target_modules: got ['q_proj']",
        ),
        ({}, True, DataError, "data file not found"),
        ({"privacy": {"target_epsilon": 0.05}}, False, UnreachableTargetError, "hospital a:"),
    ],
    ids=["LoRA targets", "own records missing", "unreachable target"],
)
def test_a_hospital_refuses_before_its_ledger_is_opened(
    tmp_path, local_model_dir, changes, own_records, error, message
):
    config = _site_config(tmp_path, local_model_dir, **changes)
    ledger = tmp_path / "hospital" / "ledger.db"
    own = LocalDataSource(str(tmp_path / "missing.jsonl"), "jsonl") if own_records else None
    with pytest.raises(error, match=message.replace("[", r"\[")):
        HospitalSite(
            config,
            0,
            f"sqlite:///{ledger}",
            local_data=own,
            split_key=bytes(32) if own else None,
        )
    assert not ledger.parent.exists()


@pytest.fixture
def _server_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; give the test one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


class ClientAppGrid:
    """Flower's Grid as the ServerApp uses it, delivering each message to the real ClientApp
    handler of a node with its own node config; it records every message type it carried."""

    def __init__(self, run_config: dict, node_configs: dict[int, dict]) -> None:
        self.contexts = {
            node_id: Context(1, node_id, node_config, RecordDict(), run_config)
            for node_id, node_config in node_configs.items()
        }
        self.sent: list[str] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message.metadata.message_type)
            assert message.metadata.message_type == "query", "only status queries may be sent"
            replies.append(status_handler(message, self.contexts[message.metadata.dst_node_id]))
        return replies


@pytest.mark.usefixtures("_server_identity")
def test_one_failing_hospital_stops_the_run_before_anything_is_charged(tmp_path, local_model_dir):
    config = _site_config(tmp_path, local_model_dir, evaluation={"release": "dp"})
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    own_ledger = tmp_path / "a" / "ledger.db"
    grid = ClientAppGrid(
        {},
        {
            # hospital a is deployed with its own (missing) records; b is simulated
            1: {
                "hospital-name": "a",
                "data-path": str(tmp_path / "a" / "missing.jsonl"),
                "ledger-url": f"sqlite:///{own_ledger}",
                "split-key-file": str(tmp_path / "a" / "split.key"),
            },
            2: {"partition-id": 1, "num-partitions": 2},
        },
    )
    report = RunReport(run_dir, config)
    ledger = ServerLedger(f"sqlite:///{run_dir / 'server.db'}")
    ledger.start_run("r", config.model_dump_json())
    run_federation(grid, config, run_dir, report, ledger, completed=0, keyring=None)
    assert grid.sent == ["query", "query"]
    saved = read_report_json(run_dir)
    assert saved["status"] == "failed"
    assert saved["causes"] == [
        f"hospital a: DataError: data file not found: {tmp_path / 'a' / 'missing.jsonl'} "
        "(expected an existing file)"
    ]
    assert not own_ledger.exists()
    healthy = NodePrivacyLedger(
        f"sqlite:///{run_dir / 'hospitals' / 'b' / 'ledger.db'}", "b", epsilon_cap=8.0, delta=1e-5
    )
    assert healthy.history() == []


@pytest.mark.usefixtures("_server_identity")
def test_simulated_supernodes_must_match_the_hospitals(tmp_path):
    config = validate_config(_base(tmp_path))
    check_node_count(config, {"partition-id": 0, "num-partitions": 2})
    check_node_count(config, {"hospital-name": "a"})
    with pytest.raises(PreflightError, match="num-supernodes: got 3; expected 2"):
        check_node_count(config, {"partition-id": 0, "num-partitions": 3})
    node = {"partition-id": 2, "num-partitions": 3}
    context = Context(1, 5, node, RecordDict(), {})
    run = {"run-dir": str(tmp_path / "r"), "run-id": "r", EXPERIMENT: experiment_json(config)}
    query = Message(
        RecordDict({"config": ConfigRecord(run)}),
        message_type=MessageType.QUERY,
        dst_node_id=5,
    )
    reply = status_handler(query, context)
    assert reply.has_error()
    assert reply.error.reason.startswith("hospital node 5: PreflightError: num-supernodes: got 3")
    assert "\n" not in reply.error.reason
    assert not (tmp_path / "r").exists()
