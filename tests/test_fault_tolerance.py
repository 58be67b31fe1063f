"""Hospitals that drop out mid-round: the run goes on, and the privacy books stay right.

Flower's Grid is replaced by a double (it is not our code) whose "hospitals" do what a real
ClientApp does with its privacy: a real plan and a real ``NodePrivacyLedger``, charged before
training. One of them charges and then never answers, as a SuperNode killed mid-round does.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedllm.config import ConfigError, validate_config
from fedllm.federation.node_registry import NodeRegistry, RegisteredHospital
from fedllm.privacy.events import event_to_dict
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.privacy.plan import plan_hospital
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.run_report import RunReport, read_report_json
from fedllm.strategies.cohort_rounds import RoundLostError
from fedllm.strategies.privacy_aware import PrivacyAwareStrategy
from fedllm.strategies.recorder import RunRecorder

NAMES = ("alpha", "beta", "gamma")
TIMEOUT_S = 7.5


def _config(**strategy):
    return validate_config(
        {
            "run": {"rounds": 2, "seed": 1},
            "federation": {
                "num_hospitals": 3,
                "cohort_size": 3,
                "hospitals": [{"name": n, "data_size": 100} for n in NAMES],
            },
            "training": {"local_steps": 2, "batch_size": 8},
            "privacy": {"target_epsilon": 8.0},
            "evaluation": {"baselines": []},
            "strategy": {"selection": "random", "round_timeout_s": TIMEOUT_S, **strategy},
        }
    )


class RemoteHospital:
    """The far side of the double: answers like the ClientApp, charging before training."""

    def __init__(
        self, config, node_id, name, ledger_url, *, drop_in_round=None, fail_in_round=None
    ):
        self.node_id = node_id
        self.name = name
        self.plan = plan_hospital(config, name, 80, None)
        self.ledger = NodePrivacyLedger(
            ledger_url,
            name,
            epsilon_cap=self.plan.epsilon_cap,
            delta=config.privacy.delta,
            accountant=config.privacy.accountant,
        )
        self.drop_in_round = drop_in_round
        self.fail_in_round = fail_in_round
        self.alive = True

    def handle(self, message: Message) -> Message | None:
        if not self.alive:
            return None
        config = message.content["config"]
        if message.metadata.message_type == MessageType.QUERY:
            return self._reply(message, {"status": ConfigRecord(self._status())})
        if message.metadata.message_type == MessageType.EVALUATE:
            metrics = {"evaluated": 1, "eval-loss-sum": 30.0 + self.node_id, "eval-count": 10}
            return self._reply(message, {"metrics": MetricRecord(metrics)})
        server_round = int(config["server-round"])
        self.ledger.charge(self.plan.round_events(), round_id=server_round, run_id="t")
        if server_round == self.drop_in_round:
            self.alive = False  # killed after charging, before replying
            return None
        if server_round == self.fail_in_round:
            return Message(Error(code=0, reason="ClientApp crashed"), reply_to=message)
        adapter = {k: v + 1.0 for k, v in message.content["arrays"].to_torch_state_dict().items()}
        metrics = {
            "num-examples": 80,
            "epsilon": self.ledger.spent_epsilon(),
            "epsilon-cap": self.plan.epsilon_cap,
            "noise-multiplier": self.plan.noise_multiplier,
            "sample-rate": self.plan.sample_rate,
            "steps": self.ledger.total_steps(),
            "rounds-participated": self.ledger.rounds_participated(),
        }
        events = json.dumps([event_to_dict(e) for e in self.plan.round_events()])
        return self._reply(
            message,
            {
                "arrays": ArrayRecord(adapter),
                "metrics": MetricRecord(metrics),
                "privacy": ConfigRecord({"events": events}),
            },
        )

    def _status(self):
        events = self.plan.round_events()
        return {
            "hospital": self.name,
            "num-units": 80,
            "speed": 1.0,
            "epsilon": self.ledger.spent_epsilon(),
            "epsilon-next": self.ledger.projected_epsilon(events),
            "epsilon-cap": self.plan.epsilon_cap,
            "can-afford": int(self.ledger.can_afford(events)),
            "round-events": json.dumps([event_to_dict(e) for e in events]),
        }

    @staticmethod
    def _reply(message, records):
        return Message(RecordDict(records), reply_to=message)


class DroppingGrid:
    """Flower's Grid as the strategy uses it; a dead hospital stays listed (as until its
    heartbeat expires) and simply never replies."""

    def __init__(self, hospitals):
        self.hospitals = {h.node_id: h for h in hospitals}
        self.timeouts: list[float | None] = []
        self.sent: list[tuple[str, int]] = []

    def get_node_ids(self):
        return list(self.hospitals)

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for message in messages:
            self.sent.append((message.metadata.message_type, message.metadata.dst_node_id))
            reply = self.hospitals[message.metadata.dst_node_id].handle(message)
            if reply is not None:
                replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; give the test one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def _run(tmp_path, config, **behaviour):
    node_db = f"sqlite:///{tmp_path / 'nodes.db'}"
    hospitals = [
        RemoteHospital(config, node_id, name, node_db, **behaviour.get(name, {}))
        for node_id, name in enumerate(NAMES, start=11)
    ]
    grid = DroppingGrid(hospitals)
    report = RunReport(tmp_path, config)
    ledger = ServerLedger(f"sqlite:///{tmp_path / 'server.db'}")
    ledger.start_run("t", config.model_dump_json())
    recorder = RunRecorder(report, ledger, "t", tmp_path, checkpoint_writer=_save_state)
    strategy = PrivacyAwareStrategy.from_config(
        config, recorder=recorder, run_context={"run-dir": str(tmp_path), "run-id": "t"}
    )
    initial = {"w": torch.zeros(3)}
    strategy.query_status(grid)
    result = strategy.start(
        grid, ArrayRecord(initial), num_rounds=2, timeout=config.strategy.round_timeout_s
    )
    return grid, report.data["rounds"], ledger, {h.name: h for h in hospitals}, result


def _save_state(state, directory):
    """The round-checkpoint writer for these plain tensors (the ServerApp's needs a PeftModel)."""
    directory.mkdir(parents=True)
    torch.save(dict(state), directory / "state.pt")


def _dicts(events):
    return [event_to_dict(e) for e in events]


def test_lost_hospital_does_not_stall_the_run_and_its_spending_is_mirrored(tmp_path):
    grid, rows, ledger, hospitals, _ = _run(tmp_path, _config(), gamma={"drop_in_round": 1})
    assert [row["round"] for row in rows] == [1, 2]
    first, second = rows
    assert first["selected"] == ["alpha", "beta", "gamma"]
    assert first["lost"] == ["gamma"]
    assert first["failed"] == []
    assert first["skipped"] is False
    assert first["perplexity"] is not None
    # gone from then on: not asked to evaluate, not answering the next status query
    evaluate_targets = [n for kind, n in grid.sent if kind == MessageType.EVALUATE]
    assert hospitals["gamma"].node_id not in evaluate_targets
    assert second["ineligible"] == {"gamma": "did not answer the status query"}
    assert second["selected"] == ["alpha", "beta"]
    assert second["lost"] == []
    # every wait was bounded by the configured round timeout
    assert grid.timeouts
    assert set(grid.timeouts) == {TIMEOUT_S}
    # the server mirrors exactly what each hospital's own ledger charged, the lost one included
    for name, hospital in hospitals.items():
        assert _dicts(ledger.hospital_events("t", name)) == _dicts(hospital.ledger.events())
    assert len(hospitals["gamma"].ledger.events()) == len(hospitals["gamma"].plan.round_events())
    assert hospitals["gamma"].ledger.rounds_participated() == 1
    # the report never under-states the lost hospital's ε: it shows its own projection, which
    # is exactly what its ledger reached by charging the round, and says it is unconfirmed
    privacy = read_report_json(tmp_path)["privacy"]["hospitals"]
    assert privacy["gamma"]["epsilon_confirmed"] is False
    assert privacy["gamma"]["epsilon"] == pytest.approx(hospitals["gamma"].ledger.spent_epsilon())
    assert privacy["alpha"]["epsilon_confirmed"] is True


def test_round_below_min_cohort_is_skipped_and_keeps_the_model(tmp_path):
    _, rows, ledger, hospitals, result = _run(
        tmp_path, _config(min_cohort=3), gamma={"drop_in_round": 1}
    )
    assert [row["skipped"] for row in rows] == [True, True]
    assert rows[0]["lost"] == ["gamma"]
    for round_id in (1, 2):
        saved = torch.load(tmp_path / "checkpoints" / f"round-{round_id:04d}" / "state.pt")
        assert torch.equal(saved["w"], torch.zeros(3))
    assert ledger.checkpoint("t") == str(tmp_path / "checkpoints" / "round-0002")
    assert len(result.arrays) == 0  # Flower never received an aggregate
    # skipping aggregation does not un-spend privacy: alpha and beta trained in both rounds
    for name, hospital in hospitals.items():
        assert _dicts(ledger.hospital_events("t", name)) == _dicts(hospital.ledger.events())
    assert hospitals["alpha"].ledger.rounds_participated() == 2


def test_error_reply_is_failed_and_still_mirrored(tmp_path):
    _, rows, ledger, hospitals, _ = _run(tmp_path, _config(), beta={"fail_in_round": 2})
    assert rows[1]["failed"] == ["beta"]
    assert rows[1]["lost"] == []
    assert rows[1]["skipped"] is False
    beta = hospitals["beta"]
    assert _dicts(ledger.hospital_events("t", "beta")) == _dicts(beta.ledger.events())
    assert beta.ledger.rounds_participated() == 2


def test_min_cohort_larger_than_cohort_is_a_config_error():
    with pytest.raises(ConfigError, match="min_cohort"):
        _config(min_cohort=4)


def test_a_round_no_hospital_answers_is_not_recorded_so_a_resume_holds_it(tmp_path):
    """Every hospital gone (or the run being interrupted): round 2 cannot be held, and must not
    count as done, else a resumed run would skip it as if it had been trained."""
    everyone_drops = {name: {"drop_in_round": 1} for name in NAMES}
    with pytest.raises(RoundLostError, match="round 2: no hospital answered its status query"):
        _run(tmp_path, _config(), **everyone_drops)
    ledger = ServerLedger(f"sqlite:///{tmp_path / 'server.db'}")
    assert ledger.last_completed_round("t") == 1


def test_a_node_claiming_a_name_its_registered_key_does_not_hold_is_refused(tmp_path):
    """A deployed SuperLink's node registry binds each hospital name to one key's node id: an
    impostor (beta's node claiming to be alpha) and an unregistered node take no place."""
    config = _config()
    node_db = f"sqlite:///{tmp_path / 'nodes.db'}"
    hospitals = [
        RemoteHospital(config, 11, "alpha", node_db),
        RemoteHospital(config, 12, "alpha", node_db),  # beta's registered node, claiming alpha
        RemoteHospital(config, 13, "gamma", node_db),  # a node the operator never registered
    ]
    registry = NodeRegistry(
        tmp_path / "node-registry.json",
        {
            name: RegisteredHospital(name, f"{name}-key-sha256", node_id)
            for name, node_id in (("alpha", 11), ("beta", 12), ("gamma", 14))
        },
    )
    report = RunReport(tmp_path, config)
    ledger = ServerLedger(f"sqlite:///{tmp_path / 'server.db'}")
    ledger.start_run("t", config.model_dump_json())
    strategy = PrivacyAwareStrategy.from_config(
        config,
        recorder=RunRecorder(report, ledger, "t", tmp_path, checkpoint_writer=_save_state),
        run_context={"run-dir": str(tmp_path), "run-id": "t"},
        node_registry=registry,
    )
    strategy.query_status(DroppingGrid(hospitals))
    assert [view.name for view in strategy.views.values()] == ["alpha"]
    assert set(strategy.problems) == {12, 13}
    assert (
        "claims hospital 'alpha' but its registered key belongs to 'beta'"
        in (strategy.problems[12])
    )
    assert "is not in the operator's node registry" in strategy.problems[13]
    # without a registry (a simulation) the same claims are taken as they come
    unchecked = PrivacyAwareStrategy.from_config(
        config,
        recorder=RunRecorder(report, ledger, "t", tmp_path, checkpoint_writer=_save_state),
        run_context={"run-dir": str(tmp_path), "run-id": "t"},
    )
    unchecked.query_status(DroppingGrid(hospitals))
    assert not unchecked.problems
