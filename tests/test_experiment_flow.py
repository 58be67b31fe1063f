"""The experiment is parsed once, where the run starts, and travels as data.

``fedllm run`` passes the validated config to the ServerApp through Flower's run config; the
ServerApp (which reads the YAML itself only under a plain ``flwr run``) sends it to hospitals
inside every message, and a ClientApp builds its site from that, never from a file. The run's
progress reaches the CLI as events in the ServerApp's log, the stream ``flwr run`` prints.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

import pytest
import structlog
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import parse_config_args
from flwr.supercore.task_identity import TaskIdentity
from test_adapter_delivery import HandlerGrid
from test_node_server import TINY
from test_preflight import _base

from fedllm.clients import client_app
from fedllm.clients.client_app import status
from fedllm.config import ConfigError, load_config, validate_config
from fedllm.federation.experiment import (
    EXPERIMENT,
    experiment_from_json,
    experiment_json,
    given_experiment,
)
from fedllm.federation.launcher import run_config_value
from fedllm.models.checkpoints import load_round_checkpoint
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.progress import ROUND_EVENT, STARTED_EVENT, progress_event
from fedllm.report.run_report import RunReport, read_report_json
from fedllm.security.encryption import MAGIC, EncryptionError, KeyRing
from fedllm.security.environment import ENV_VAR, FILE_ENV_VAR
from fedllm.strategies.recorder import RunRecorder
from fedllm.strategies.server_app import main
from fedllm.telemetry.logging import configure_logging


@pytest.fixture(autouse=True)
def _leave_no_state():
    """The ServerApp (and a test here) point structlog at this test's captured stderr, which
    pytest closes afterwards, and ClientApps cache their sites per process: later tests must
    log where they did before and build their own sites."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    client_app._SITES.clear()


@pytest.fixture
def _server_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; give the test one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def _experiment(tmp_path: Path, **run) -> dict:
    raw = _base(tmp_path)
    raw["run"] |= {"name": "flow", "rounds": 1, **run}
    return {**raw, "model": TINY.model_dump(mode="json")}


def test_the_experiment_crosses_flowers_run_config_parser_unchanged(tmp_path):
    """What `flwr run --run-config` makes of the value is the validated config, even with a
    quote and non-ASCII text in it (Flower's parser allows no quote inside a quoted value)."""
    config = validate_config(_experiment(tmp_path, output_dir=str(tmp_path / "o'brien é")))
    text = experiment_json(config)
    assert "'" not in text
    assert text == experiment_json(experiment_from_json(text, "test"))  # canonical
    parsed = parse_config_args([f"{EXPERIMENT}={run_config_value(text)}"])
    assert experiment_from_json(parsed[EXPERIMENT], "test") == config
    assert config.run.output_dir == str(tmp_path / "o'brien é")


def test_a_resolved_experiment_refuses_overrides_beside_it(tmp_path):
    config = validate_config(_experiment(tmp_path))
    given = {EXPERIMENT: experiment_json(config), "overrides": "", "num-server-rounds": 0}
    assert given_experiment(given) == config
    assert given_experiment({"config-file": "configs/default.yaml", EXPERIMENT: ""}) is None
    for extra in ({"overrides": "run.rounds=3"}, {"num-server-rounds": 3}):
        with pytest.raises(
            ConfigError, match=r"already resolved; got overrides \['run.rounds=3'\]"
        ):
            given_experiment({**given, **extra})


@pytest.mark.usefixtures("_server_identity")
def test_a_hospital_builds_its_site_from_the_message_not_from_a_file(tmp_path):
    """The node's run config names a YAML with other hospitals: the ClientApp never reads it."""
    decoy = tmp_path / "decoy.yaml"
    other = _experiment(tmp_path)
    other["federation"] |= {"hospitals": [{"name": "x"}, {"name": "y"}]}
    decoy.write_text(yaml.safe_dump(other), encoding="utf-8")
    node = {"partition-id": 1, "num-partitions": 2}
    context = Context(1, 3, node, RecordDict(), {"config-file": str(decoy)})
    config = validate_config(_experiment(tmp_path))
    run = {"run-dir": str(tmp_path / "runs" / "flow"), "run-id": "flow"}

    def query(content: dict) -> Message:
        return Message(
            RecordDict({"config": ConfigRecord({**run, **content})}),
            message_type=MessageType.QUERY,
            dst_node_id=3,
        )

    # no base-model hash: refused, but the failure is labelled from the message's experiment
    reply = status(query({EXPERIMENT: experiment_json(config)}), context)
    assert reply.error.reason.startswith("hospital b: BaseModelMismatchError")
    reply = status(query({}), context)
    assert reply.error.reason == (
        "hospital node 3: ConfigError: the server's message carries no 'experiment': the server "
        "runs another fedllm version than this hospital"
    )


class VanishingConfigGrid(HandlerGrid):
    """Delivers every message to the real ClientApp handlers, after deleting the experiment
    YAML the ServerApp was started with; keeps every message's config record."""

    def __init__(self, config_file: Path, node_configs: dict[int, dict]) -> None:
        super().__init__({"config-file": str(config_file)}, node_configs)
        self.config_file = config_file
        self.configs: list[dict] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.config_file.unlink(missing_ok=True)
        self.configs += [dict(message.content["config"]) for message in messages]
        return super().push_messages(messages)


@pytest.mark.usefixtures("_server_identity")
def test_a_run_goes_on_after_its_yaml_is_deleted(tmp_path):
    """Under a plain `flwr run` the ServerApp reads the YAML once; hospitals never do."""
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(_experiment(tmp_path)), encoding="utf-8")
    run_dir = tmp_path / "runs" / "flow"
    nodes = {
        5: {"partition-id": 0, "num-partitions": 2},
        6: {"partition-id": 1, "num-partitions": 2},
    }
    grid = VanishingConfigGrid(config_file, nodes)
    context = Context(
        1, 0, {}, RecordDict(), {"config-file": str(config_file), "run-dir": str(run_dir)}
    )
    main(grid, context)
    assert not config_file.exists()
    report = read_report_json(run_dir)
    assert report["status"] == "completed", report.get("error")
    assert [row["round"] for row in report["rounds"]] == [1]
    recorded = experiment_json(load_config(run_dir / "config.yaml"))
    assert {"query", "train"} <= set(grid.sent)
    assert [config[EXPERIMENT] for config in grid.configs] == [recorded] * len(grid.configs)


@pytest.mark.usefixtures("_server_identity")
def test_server_and_client_apps_encrypt_at_rest_with_the_key_ring_of_their_environment(
    tmp_path, monkeypatch
):
    """Both apps are entry points: each reads FEDLLM_ENCRYPTION_KEYS and hands the key ring to
    the ledgers and checkpoint code, which never read the environment themselves."""
    keyring = KeyRing.generate()
    monkeypatch.delenv(FILE_ENV_VAR, raising=False)
    monkeypatch.setenv(ENV_VAR, keyring.to_json())
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(_experiment(tmp_path)), encoding="utf-8")
    run_dir = tmp_path / "runs" / "flow"
    nodes = {
        5: {"partition-id": 0, "num-partitions": 2},
        6: {"partition-id": 1, "num-partitions": 2},
    }
    grid = HandlerGrid({"config-file": str(config_file)}, nodes)
    context = Context(
        1, 0, {}, RecordDict(), {"config-file": str(config_file), "run-dir": str(run_dir)}
    )
    main(grid, context)
    report = read_report_json(run_dir)
    assert report["status"] == "completed", report.get("error")

    checkpoints = [run_dir / "checkpoint", run_dir / "checkpoints" / "round-0001"]
    files = [path for directory in checkpoints for path in directory.iterdir()]
    assert files
    assert all(path.read_bytes().startswith(MAGIC) for path in files)
    assert load_round_checkpoint(checkpoints[1], keyring=keyring)
    ledgers = {
        run_dir / "server.db": "server_privacy_events",
        **{path: "privacy_events" for path in run_dir.glob("hospitals/*/ledger.db")},
    }
    assert len(ledgers) == 3  # the server's and both hospitals'
    for path, table in ledgers.items():
        with sqlite3.connect(path) as database:
            rows = [row[0] for row in database.execute(f"SELECT event FROM {table}")]
        assert rows, path
        assert all(base64.b64decode(row).startswith(MAGIC) for row in rows), path


@pytest.mark.usefixtures("_server_identity")
def test_the_server_app_refuses_a_missing_key_file_before_writing_anything(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv(FILE_ENV_VAR, str(tmp_path / "gone.json"))
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(_experiment(tmp_path)), encoding="utf-8")
    run_dir = tmp_path / "runs" / "flow"
    grid = HandlerGrid({"config-file": str(config_file)}, {5: {"partition-id": 0}})
    context = Context(
        1, 0, {}, RecordDict(), {"config-file": str(config_file), "run-dir": str(run_dir)}
    )
    with pytest.raises(EncryptionError, match="gone"):
        main(grid, context)
    refusal = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert refusal["event"] == "run.refused"
    assert refusal["reason"].startswith("$FEDLLM_ENCRYPTION_KEY_FILE: no key file at ")
    assert not run_dir.exists()
    assert grid.sent == []


def test_each_recorded_round_is_one_progress_event_in_the_servers_log(tmp_path, capsys):
    """The recorder logs what `fedllm run` shows; the CLI finds it among other output lines."""
    config = validate_config(_experiment(tmp_path))
    ledger = ServerLedger(f"sqlite:///{tmp_path / 'server.db'}")
    ledger.start_run("flow", config.model_dump_json())
    recorder = RunRecorder(RunReport(tmp_path, config), ledger, "flow", tmp_path)
    configure_logging(json_output=True)
    capsys.readouterr()
    row = {
        "round": 1,
        "selected": ["a"],
        "utility": {"a": 1.0},
        "inclusion_probability": {"a": 0.5, "b": 0.5},
        "ineligible": {},
        "epsilon": {"a": 1.5, "b": None},
        "perplexity": 42.0,
    }
    recorder.close_round(row, {}, {})
    lines = capsys.readouterr().err.splitlines()
    events = [event for event in map(progress_event, lines) if event is not None]
    assert [
        {key: event[key] for key in ("event", "round", "rounds", "cohort", "max_epsilon")}
        for event in events
    ] == [{"event": ROUND_EVENT, "round": 1, "rounds": 1, "cohort": 1, "max_epsilon": 1.5}]
    streamed = [
        "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation",
        '\x1b[36m(ClientAppActor pid=8)\x1b[0m {"round": 1, "event": "hospital.trained"}',
        '{"run_dir": "/r", "event": "run.started", "level": "info"}',
        "{not json",
    ]
    assert [progress_event(line) for line in streamed] == [
        None,
        None,
        {"run_dir": "/r", "event": STARTED_EVENT, "level": "info"},
        None,
    ]
