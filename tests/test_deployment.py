"""A real deployed federation on loopback: `fedllm superlink start` (TLS + SuperNode
authentication, certificates from `init_credentials`), three `fedllm hospital start`
SuperNodes with their own data files and ledgers, and `fedllm run --federation` from a
researcher's Flower config. Also: an unregistered key is refused, and a hospital killed
mid-run leaves a run that finishes with its privacy spending mirrored exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from federation_helpers import TINY_TEST_MODEL, flower_processes

from fedllm.data import generate_clinical_records
from fedllm.federation.experiment import APP_ROOT
from fedllm.federation.flower_cli import write_flower_connection
from fedllm.federation.launcher import free_port, stop_process_tree
from fedllm.federation.run_identity import RUN_ID_FILE
from fedllm.privacy.events import event_to_dict
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.security.certs import init_credentials

pytestmark = pytest.mark.integration

HOSPITALS = {"north": 6.0, "south": 5.0, "west": 6.0}
DELTA = 1e-5


def _flatten(prefix: str, value: object) -> list[str]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}", v)]
    return [f"{prefix}={value}"]


def _overrides(root: Path, name: str, timeout_s: float) -> list[str]:
    hospitals = ", ".join(f"{{name: {n}}}" for n in HOSPITALS)
    settings = [
        f"run.name={name}",
        "run.rounds=2",
        "run.seed=3",
        f"run.output_dir={root / 'runs'}",
        "federation.num_hospitals=3",
        "federation.cohort_size=3",
        f"federation.hospitals=[{hospitals}]",
        *_flatten("model", TINY_TEST_MODEL),
        "training.local_steps=2",
        "training.batch_size=8",
        "training.device=cpu",
        "privacy.target_epsilon=4.0",
        f"privacy.delta={DELTA}",
        "evaluation.baselines=[]",
        "evaluation.max_eval_sequences=16",
        # configs/default.yaml evaluates exactly (a simulation's own data); hospitals in a
        # deployment release their held-out loss only noised and charged
        "evaluation.release=dp",
        "strategy.selection=random",
        f"strategy.round_timeout_s={timeout_s}",
    ]
    return [arg for setting in settings for arg in ("--set", setting)]


class Federation:
    """Every process of the deployment, and what the test needs to reach them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(
            os.environ, FEDLLM_CACHE_DIR=str(root / "cache"), FLWR_HOME=str(root / "researcher")
        )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.configs: dict[str, Path] = {}
        self.address = ""
        self.control = ""

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.out").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "fedllm.cli", *args],
            cwd=APP_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self.processes[name]

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def wait_for_output(self, name: str, text: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output(name):
            assert self.processes[name].poll() is None, self.output(name)[-3000:]
            assert time.monotonic() < deadline, self.output(name)[-3000:]
            time.sleep(0.3)

    def run(self, name: str, timeout_s: float) -> subprocess.Popen[bytes]:
        args = ["run", "configs/default.yaml", "--federation", "consortium", "--json"]
        return self.start(name, *args, *_overrides(self.root, name, timeout_s))

    def ledger(self, hospital: str) -> NodePrivacyLedger:
        url = f"sqlite:///{self.root / hospital / 'state' / 'ledger.db'}"
        return NodePrivacyLedger(url, hospital, epsilon_cap=HOSPITALS[hospital], delta=DELTA)

    def stop_all(self) -> None:
        for process in self.processes.values():
            stop_process_tree(process)


def _hospital_yaml(root: Path, creds, name: str, address: str, cap: float) -> Path:
    folder = root / name
    folder.mkdir()
    # ~40 patients: each lands on the evaluation side with probability 0.2 under the
    # hospital's secret split key, so an empty side has probability 0.8^40 ≈ 1e-4 (with 70
    # records, ~23 patients, it was 0.6 % per hospital and the run failed now and then)
    records = generate_clinical_records(120, None, seed=len(name), hospital_tag=name)
    with (folder / "notes.jsonl").open("w") as handle:
        for record in records:
            row = {"note": record.text, "specialty": record.specialty, "patient": record.patient_id}
            handle.write(json.dumps(row) + "\n")
    private, public = creds.supernode_keys[name]
    config = {
        "hospital": name,
        "superlink": {"address": address, "ca_cert": str(creds.ca_cert)},
        "auth": {"private_key": str(private), "public_key": str(public)},
        "data": {
            "path": "notes.jsonl",
            "text_field": "note",
            "specialty_field": "specialty",
            "patient_field": "patient",
        },
        "privacy": {"ledger_url": "sqlite:///state/ledger.db", "epsilon_cap": cap},
        "runtime": {"state_dir": "state", "clientapp_port": free_port()},
    }
    path = folder / "hospital.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    creds = init_credentials(root / "credentials", hospitals=[*HOSPITALS, "rogue"])
    port, control_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"  # the public front: SuperNodes' Fleet API only
    # the researcher reaches the Control API on the SuperLink's loopback port
    control = f"127.0.0.1:{control_port}"
    write_flower_connection(root / "researcher", "consortium", control, creds.ca_cert)
    deployment = Federation(root)
    deployment.address = address
    deployment.control = control
    try:
        registered = [arg for name in HOSPITALS for arg in ("--hospital", name)]
        deployment.start(
            "superlink",
            "superlink",
            "start",
            "--credentials",
            str(creds.root),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--control-port",
            str(control_port),
            "--state-dir",
            str(root / "superlink"),
            *registered,
        )
        deployment.wait_for_output("superlink", "Ctrl-C stops")
        deployment.configs = {
            name: _hospital_yaml(root, creds, name, address, cap) for name, cap in HOSPITALS.items()
        }
        deployment.configs["rogue"] = _hospital_yaml(root, creds, "rogue", address, 6.0)
        for name in HOSPITALS:
            deployment.start(name, "hospital", "start", "--config", str(deployment.configs[name]))
        yield deployment
    finally:
        deployment.stop_all()


@pytest.fixture(scope="module")
def finished_run(federation):
    """One 2-round run in which `west` is killed once it has charged its ledger for round 1.

    Flower starts a ClientApp process per message, so runs cost minutes on a small machine:
    the normal path (north, south) and the drop-out path (west) share this one run.
    """
    run = federation.run("deployed", timeout_s=300)
    west = federation.ledger("west")
    deadline = time.monotonic() + 600
    run_id_file = federation.root / "runs" / "deployed" / RUN_ID_FILE
    while not run_id_file.exists():
        assert run.poll() is None, federation.output("deployed")[-4000:]
        assert time.monotonic() < deadline, "the ServerApp never chose its run id"
        time.sleep(0.05)
    # what hospitals' ledgers record: the run's name plus a suffix unique to this run
    run_id = run_id_file.read_text().strip()
    while not any(r["run_id"] == run_id and r["round_id"] == 1 for r in west.history()):
        assert run.poll() is None, federation.output("deployed")[-4000:]
        assert time.monotonic() < deadline, "west never trained"
        time.sleep(0.05)
    stop_process_tree(federation.processes["west"])  # charged for round 1: now it dies
    # a run that lost a hospital is degraded: it finishes, but exits non-zero and says why
    assert run.wait(timeout=900) == 1, federation.output("deployed")[-4000:]
    assert "hospital west:" in federation.output("deployed")
    run_dir = federation.root / "runs" / "deployed"
    return run_dir, json.loads((run_dir / "report.json").read_text())


def test_superlink_registered_the_hospitals_keys(federation):
    output = federation.output("superlink")
    for name in HOSPITALS:
        assert f"hospital {name}: registered" in output
    log = (federation.root / "superlink" / "superlink.log").read_text()
    assert "SuperNode authentication is disabled" not in log  # Flower warns when it is off


def test_unregistered_supernode_is_refused(federation):
    rogue = federation.start(
        "rogue", "hospital", "start", "--config", str(federation.configs["rogue"])
    )
    assert rogue.wait(timeout=120) != 0
    output = federation.output("rogue")
    assert "refused this SuperNode's key" in output
    assert "Failed to activate SuperNode" in output
    log = (federation.root / "superlink" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in log


def test_deployed_run_finishes_with_every_hospital_within_its_cap(federation, finished_run):
    run_dir, report = finished_run
    assert report["status"] == "degraded"
    assert any(cause.startswith("hospital west:") for cause in report["causes"])
    first, second = report["rounds"]
    assert [first["round"], second["round"]] == [1, 2]
    assert first["selected"] == sorted(HOSPITALS)
    # west was killed mid-round 1: lost (unless its reply beat the kill), gone in round 2
    assert first["lost"] in ([], ["west"])
    assert second["ineligible"] == {"west": "did not answer the status query"}
    assert second["selected"] == ["north", "south"]
    for row in (first, second):
        assert row["failed"] == []
        assert row["skipped"] is False
        assert row["perplexity"] >= 1.0  # a noised, clamped DP evaluation
    reported = report["privacy"]["hospitals"]
    assert set(reported) == set(HOSPITALS)
    for name, state in reported.items():
        assert state["epsilon_cap"] == HOSPITALS[name]  # the cap from its hospital.yaml
        assert 0 < state["epsilon"] <= HOSPITALS[name]
        # a lost hospital's ε is its own projection for the round it charged: unconfirmed,
        # and equal to what its ledger reached
        assert state["epsilon_confirmed"] is (name not in first["lost"])
        if name in first["lost"]:
            assert federation.ledger(name).spent_epsilon() == pytest.approx(state["epsilon"])
    for name in ("north", "south"):
        state = report["privacy"]["hospitals"][name]
        assert state["rounds_participated"] == 2
        assert federation.ledger(name).spent_epsilon() == pytest.approx(state["epsilon"])
    # the hospitals' ledgers live where hospital.yaml put them, not in the run directory
    assert not (run_dir / "hospitals").exists()


def test_server_ledger_mirrors_every_hospital_ledger_the_killed_one_included(
    federation, finished_run
):
    run_dir, _ = finished_run
    server = ServerLedger(f"sqlite:///{run_dir / 'server.db'}")
    for name in HOSPITALS:
        history = federation.ledger(name).history()
        run_id = (run_dir / RUN_ID_FILE).read_text().strip()
        assert run_id.startswith("deployed-")
        charged = [r["event"] for r in history if r["run_id"] == run_id]
        mirrored = [event_to_dict(e) for e in server.hospital_events("deployed", name)]
        assert charged, name
        assert charged == mirrored, name
        rounds = {r["round_id"] for r in history if r["run_id"] == run_id}
        # round 0: the noised evaluation of the base model, before round 1
        assert rounds == ({0, 1} if name == "west" else {0, 1, 2})


def test_registering_the_refused_key_lets_it_join(federation, finished_run):
    register = federation.start(
        "register",
        "superlink",
        "register",
        "--credentials",
        str(federation.root / "credentials"),
        "--hospital",
        "rogue",
        "--address",
        federation.control,
        "--state-dir",
        str(federation.root / "superlink"),
    )
    assert register.wait(timeout=120) == 0, federation.output("register")
    assert "hospital rogue: registered" in federation.output("register")
    (federation.root / "rogue.out").unlink()
    superlink_log = federation.root / "superlink" / "superlink.log"
    activations = _read(superlink_log).count("[Fleet.ActivateNode] Activated")
    rogue = federation.start(
        "rogue", "hospital", "start", "--config", str(federation.configs["rogue"])
    )
    deadline = time.monotonic() + 60
    while _read(superlink_log).count("[Fleet.ActivateNode] Activated") == activations:
        assert rogue.poll() is None, federation.output("rogue")
        assert time.monotonic() < deadline, federation.output("rogue")
        time.sleep(0.3)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_nothing_left_running(federation, finished_run):
    federation.stop_all()
    assert flower_processes(federation.root) == set()
    leftovers = [
        p.pid
        for p in psutil.process_iter()
        if any(str(federation.root) in part for part in _cmdline(p))
    ]
    assert leftovers == []


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []
