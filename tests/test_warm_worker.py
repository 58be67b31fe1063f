"""The hospital's worker is its SuperNode's executor: one process runs every round's task.

Real components: `fedllm superlink start --insecure` (a real SuperLink), `fedllm hospital
start` (a real `flower-supernode --isolation process` and `fedllm hospital worker` claiming its
tasks over Flower's Runtime API), a real `fedllm run --federation` of two rounds on a tiny
model, real SQLite ledgers. Which process ran each task, and whether it built its site again,
is read from the worker's own log, never from timing. The reply check and the failure path are
also exercised on the real ClientApp in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from federation_helpers import TINY_TEST_MODEL, start_cli
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedllm.clients import client_app
from fedllm.data import generate_clinical_records
from fedllm.federation import delivery
from fedllm.federation.deployment import hospital_supernode_command
from fedllm.federation.flower_cli import write_flower_connection
from fedllm.federation.hospital_config import load_hospital_config
from fedllm.federation.launcher import free_port, stop_process_tree
from fedllm.federation.warm_worker import WORKER_FAILED, checked_reply, seed_from_os_entropy
from fedllm.federation.worker_state import read_status

pytestmark = pytest.mark.integration


def _flatten(prefix: str, value: object) -> list[str]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}", v)]
    return [f"{prefix}={value}"]


def _hospital_yaml(root: Path, address: str, **runtime) -> Path:
    folder = root / "north"
    folder.mkdir(exist_ok=True)
    records = generate_clinical_records(120, None, seed=5, hospital_tag="north")
    with (folder / "notes.jsonl").open("w") as handle:
        for record in records:
            handle.write(json.dumps({"text": record.text, "patient": record.patient_id}) + "\n")
    config = {
        "hospital": "north",
        "superlink": {"address": address, "insecure": True},
        "data": {"path": "notes.jsonl", "patient_field": "patient"},
        "privacy": {"ledger_url": "sqlite:///state/ledger.db", "epsilon_cap": 8.0},
        "runtime": {"state_dir": "state", "clientapp_port": free_port(), **runtime},
    }
    path = folder / "hospital.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Processes:
    """The SuperLink, the hospital and the run, each with its output in a file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(
            os.environ,
            FEDLLM_CACHE_DIR=str(root / "cache"),
            FLWR_HOME=str(root / "researcher"),
            FEDLLM_LOG_JSON="1",
        )
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self.running[name] = start_cli(self.root / f"{name}.out", args, self.env)
        return self.running[name]

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def wait_for_output(self, name: str, text: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output(name):
            assert self.running[name].poll() is None, self.output(name)[-3000:]
            assert time.monotonic() < deadline, self.output(name)[-3000:]
            time.sleep(0.3)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A two-round run with one hospital whose SuperNode's tasks its worker runs."""
    root = tmp_path_factory.mktemp("warm")
    port, control_port = free_port(), free_port()
    write_flower_connection(
        root / "researcher", "local", f"127.0.0.1:{control_port}", None, insecure=True
    )
    processes = Processes(root)
    hospital = _hospital_yaml(root, f"127.0.0.1:{port}")
    try:
        processes.start(
            "superlink",
            *("superlink", "start", "--insecure", "--host", "127.0.0.1", "--port", str(port)),
            *("--control-port", str(control_port), "--state-dir", str(root / "superlink")),
        )
        processes.wait_for_output("superlink", "Ctrl-C stops")
        processes.start("north", "hospital", "start", "--config", str(hospital))
        processes.wait_for_output("north", "Ctrl-C stops")
        settings = [
            "run.name=warm",
            "run.rounds=2",
            f"run.output_dir={root / 'runs'}",
            "federation.num_hospitals=1",
            "federation.cohort_size=1",
            "federation.hospitals=[{name: north}]",
            *_flatten("model", TINY_TEST_MODEL),
            "training.local_steps=2",
            "training.batch_size=8",
            "training.device=cpu",
            "privacy.target_epsilon=4.0",
            "evaluation.baselines=[]",
            "evaluation.max_eval_sequences=16",
            "evaluation.release=dp",
            "strategy.selection=random",
            "strategy.min_cohort=1",
            "strategy.round_timeout_s=300",
        ]
        overrides = [arg for setting in settings for arg in ("--set", setting)]
        run = processes.start(
            "run", "run", "configs/default.yaml", "--federation", "local", "--json", *overrides
        )
        assert run.wait(timeout=900) == 0, processes.output("run")[-4000:]
        yield processes, hospital
    finally:
        for process in reversed(processes.running.values()):
            stop_process_tree(process)


def _events(log: Path, name: str) -> list[dict]:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{") and f'"{name}"' in line]


def test_one_worker_process_runs_both_rounds_with_its_site_built_once(federation):
    processes, hospital = federation
    worker_log = hospital.parent / "state" / "worker.log"
    handled = _events(worker_log, "warm_worker.handled")
    trained = [event for event in handled if event["message_type"] == "train"]
    assert len(trained) == 2, handled
    assert all(event["status"] == "completed" for event in handled), handled
    status = read_status(hospital.parent / "state")
    assert status is not None
    assert {event["pid"] for event in handled} == {status["pid"]}
    assert len(_events(worker_log, "hospital.site_built")) == 1
    assert not _events(worker_log, "warm_worker.task_failed")  # every reply passed the inventory
    report = json.loads((processes.root / "runs" / "warm" / "report.json").read_text())
    assert [row["round"] for row in report["rounds"]] == [1, 2]
    # no Flower process per message: the SuperNode ran in process isolation
    supernode = hospital_supernode_command(load_hospital_config(hospital), write_config=False)
    assert supernode[supernode.index("--isolation") + 1] == "process"
    assert "flwr-clientapp" not in (hospital.parent / "state" / "supernode.log").read_text()


def _health(hospital: Path) -> subprocess.CompletedProcess[str]:
    health = ["hospital", "health", "--config", str(hospital), "--json"]
    return subprocess.run(
        [sys.executable, "-m", "fedllm.cli", *health],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_health_reports_the_worker(federation):
    _, hospital = federation
    parts = {part["name"]: part for part in json.loads(_health(hospital).stdout)}
    assert parts["worker"]["ok"] is True, parts
    assert parts["worker"]["state"] in ("idle", "polling")


def test_a_killed_worker_stops_the_hospital_with_one_line(federation):
    processes, hospital = federation
    status = read_status(hospital.parent / "state")
    os.kill(status["pid"], signal.SIGKILL)
    start = processes.running["north"]
    assert start.wait(timeout=60) != 0
    lines = processes.output("north").split("Ctrl-C stops.", 1)[1].strip().splitlines()
    assert len(lines) == 1, lines
    assert "the worker stopped (killed by SIGKILL)" in lines[0]
    parts = {part["name"]: part for part in json.loads(_health(hospital).stdout)}
    assert parts["worker"] == {
        "name": "worker",
        "ok": False,
        "state": "not running",
        "detail": f"process {status['pid']} is gone",
    }


@pytest.fixture
def _task_identity():
    """Flower stamps a reply with the running task's identity; give this test one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskIdentity, "_run_id", 1)
        patch.setattr(TaskIdentity, "_task_id", 1)
        patch.setattr(TaskIdentity, "_node_id", 11)
        yield


def _query() -> Message:
    content = RecordDict({"config": ConfigRecord({})})
    return Message(content, dst_node_id=11, message_type="query")


@pytest.mark.usefixtures("_task_identity")
def test_an_undeclared_key_or_a_raising_handler_is_a_one_line_error_reply():
    context = Context(1, 11, {}, RecordDict(), {})

    def leaky(message: Message, context: Context) -> Message:
        content = RecordDict({"status": ConfigRecord({"hospital": "a", "patients": "p1, p2"})})
        return Message(content, reply_to=message)

    def broken(message: Message, context: Context) -> Message:
        raise ValueError("no records\nsecond line")

    refused = checked_reply(leaky, _query(), context)
    assert refused.has_error()
    assert refused.error.code == WORKER_FAILED
    assert "patients" in refused.error.reason
    failed = checked_reply(broken, _query(), context)
    assert failed.error.reason == "ValueError: no records"
    fine = checked_reply(
        lambda m, c: Message(RecordDict({"metrics": MetricRecord({})}), reply_to=m),
        Message(RecordDict({}), dst_node_id=11, message_type="evaluate"),
        context,
    )
    assert not fine.has_error()


def test_the_deliver_action_is_the_one_the_server_sends():
    assert client_app.DELIVER_ACTION == delivery.DELIVER_ACTION


def test_cold_hospitals_keep_a_process_per_message(tmp_path):
    hospital = load_hospital_config(_hospital_yaml(tmp_path, "127.0.0.1:9092", warm_worker=False))
    command = hospital_supernode_command(hospital, write_config=False)
    assert command[command.index("--isolation") + 1] == "subprocess"
    assert "--superexec-auth-secret-file" not in command


def test_the_worker_seeds_its_global_generators_from_os_entropy():
    """Nothing the server knows (run.seed, the round) seeds the long-lived process; its DP
    draws come from fresh OS-seeded streams per release (tests/test_hospital.py)."""
    seeds = set()
    for _ in range(3):
        seed_from_os_entropy()
        seeds.add(torch.initial_seed())
    assert len(seeds) == 3
