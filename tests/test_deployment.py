"""docs/deploy.md played whole on loopback, with real processes, each step timed.

The operator writes the consortium's credentials and one bundle per hospital (`fedllm certs
init`, `fedllm certs bundle`) and builds the base model (`fedllm model build`); `fedllm
superlink start` runs a TLS SuperLink with SuperNode authentication; three hospitals run
`fedllm hospital start` (SuperNode and warm worker, and for two of them an inference server
with mutual TLS), each with its own records, ledger and bundle. The researcher's first run
(`fedllm run --federation`) loses a hospital killed mid-run; its DP adapter reaches both
inference servers by itself and is served; the killed hospital restarts; a second run's ε
composes with the first in every hospital's ledger; `fedllm deliver` delivers the second run's
adapter again. Also: an unregistered key is refused, then joins once registered.

Each step's wall time goes to the `deploy_flow_s` property of the last flow test and, when
``FEDLLM_DEPLOY_FLOW_TIMINGS`` names a file, to that file as JSON (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dp_accounting
import httpx
import psutil
import pytest
import yaml
from federation_helpers import TINY_TEST_MODEL, flower_processes, start_cli

from fedllm.data import generate_clinical_records
from fedllm.federation.delivery import ADAPTER_WEIGHTS, DELIVERIES_DIR
from fedllm.federation.experiment import APP_ROOT
from fedllm.federation.flower_cli import write_flower_connection
from fedllm.federation.launcher import free_port, stop_process_tree
from fedllm.federation.run_identity import RUN_ID_FILE
from fedllm.privacy.events import event_to_dict
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.privacy.server_ledger import ServerLedger

pytestmark = pytest.mark.integration

# each hospital's ε cap (hospital.yaml): two runs of target ε 4 fit under every one
HOSPITALS = {"north": 10.0, "south": 9.0, "west": 10.0}
# the hospitals that run an inference server beside their SuperNode
SERVING = ("north", "south")
DELTA = 1e-5
TIMINGS_ENV = "FEDLLM_DEPLOY_FLOW_TIMINGS"
ACTIVATED = "[Fleet.ActivateNode] Activated"


def _overrides(root: Path, name: str, timeout_s: float) -> list[str]:
    hospitals = ", ".join(f"{{name: {n}}}" for n in HOSPITALS)
    settings = [
        f"run.name={name}",
        "run.rounds=2",
        "run.seed=3",
        f"run.output_dir={root / 'runs'}",
        # where inference servers' adapters come from: the federation delivers it from here
        "run.publish_adapter_dir=published",
        "federation.num_hospitals=3",
        "federation.cohort_size=3",
        f"federation.hospitals=[{hospitals}]",
        # the operator's built base model, shipped to every host (docs/deploy.md)
        f"model.name={root / 'base-model'}",
        f"model.max_seq_length={TINY_TEST_MODEL['max_seq_length']}",
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


@contextmanager
def timed(times: dict[str, float], step: str) -> Iterator[None]:
    """Record the wall time of one step of the flow (reported in docs/benchmarks.md)."""
    start = time.monotonic()
    yield
    times[step] = round(time.monotonic() - start, 1)


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
        self.processes[name] = start_cli(self.root / f"{name}.out", args, self.env)
        return self.processes[name]

    def cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """One `fedllm` command run to its end, as the operator or the researcher types it."""
        return subprocess.run(
            [sys.executable, "-m", "fedllm.cli", *args],
            cwd=APP_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def wait_for_output(self, name: str, text: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.output(name):
            assert self.processes[name].poll() is None, self.output(name)[-3000:]
            assert time.monotonic() < deadline, self.output(name)[-3000:]
            time.sleep(0.3)

    def activations(self) -> int:
        """SuperNodes the SuperLink has activated so far (restarts count again)."""
        return _read(self.root / "superlink" / "superlink.log").count(ACTIVATED)

    def wait_for_activations(self, count: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while self.activations() < count:
            for name in HOSPITALS:
                process = self.processes.get(name)
                assert process is None or process.poll() is None, self.output(name)[-3000:]
            assert time.monotonic() < deadline, f"{self.activations()} of {count} activated"
            time.sleep(0.3)

    def run(self, name: str, timeout_s: float) -> subprocess.Popen[bytes]:
        args = ["run", "configs/default.yaml", "--federation", "consortium", "--json"]
        return self.start(name, *args, *_overrides(self.root, name, timeout_s))

    def ledger(self, hospital: str) -> NodePrivacyLedger:
        url = f"sqlite:///{self.root / hospital / 'state' / 'ledger.db'}"
        return NodePrivacyLedger(url, hospital, epsilon_cap=HOSPITALS[hospital], delta=DELTA)

    def inference_url(self, hospital: str) -> str:
        port = yaml.safe_load(self.configs[hospital].read_text())["inference"]["port"]
        return f"https://127.0.0.1:{port}"

    def router_tls(self) -> ssl.SSLContext:
        """What the consortium's router presents to an inference server (mutual TLS)."""
        credentials = self.root / "credentials"
        context = ssl.create_default_context(cafile=str(credentials / "ca" / "ca.crt"))
        context.load_cert_chain(
            credentials / "router" / "client.crt", credentials / "router" / "client.key"
        )
        return context

    def serving(self, hospital: str, digest: str, timeout_s: float = 120) -> tuple[dict, dict]:
        """The inference server's /v1/health once it serves the adapter hashed ``digest``, and
        a completion it then answers, over HTTPS with the router's client certificate."""
        url, tls = self.inference_url(hospital), self.router_tls()
        deadline = time.monotonic() + timeout_s
        while True:
            health = httpx.get(f"{url}/v1/health", verify=tls, timeout=10).json()
            if health["model_version"] == digest[:12]:
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.3)
        answer = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "Question: chest pain. Answer:", "max_tokens": 2},
            verify=tls,
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        return health, answer.json()

    def stop_all(self) -> None:
        for process in self.processes.values():
            stop_process_tree(process)


def _model_yaml(root: Path) -> Path:
    """The experiment whose `model.tiny` section the operator builds the base model from."""
    experiment = yaml.safe_load((APP_ROOT / "configs" / "default.yaml").read_text())
    experiment["model"] = TINY_TEST_MODEL
    path = root / "base-model.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def _hospital_yaml(root: Path, name: str, address: str, cap: float) -> Path:
    """Hospital IT's hospital.yaml, beside the operator's bundle in ``credentials/``."""
    folder = root / name
    # ~40 patients: each lands on the evaluation side with probability 0.2 under the
    # hospital's secret split key, so an empty side has probability 0.8^40 ≈ 1e-4 (with 70
    # records, ~23 patients, it was 0.6 % per hospital and the run failed now and then)
    records = generate_clinical_records(120, None, seed=len(name), hospital_tag=name)
    with (folder / "notes.jsonl").open("w") as handle:
        for record in records:
            row = {"note": record.text, "specialty": record.specialty, "patient": record.patient_id}
            handle.write(json.dumps(row) + "\n")
    config = {
        "hospital": name,
        # the names configs/hospital.yaml gives the files of the bundle
        "superlink": {"address": address, "ca_cert": "credentials/ca.crt"},
        "auth": {"private_key": "credentials/auth_key", "public_key": "credentials/auth_key.pub"},
        "data": {
            "path": "notes.jsonl",
            "text_field": "note",
            "specialty_field": "specialty",
            "patient_field": "patient",
        },
        "privacy": {"ledger_url": "sqlite:///state/ledger.db", "epsilon_cap": cap},
        "runtime": {"state_dir": "state", "clientapp_port": free_port()},
    }
    if name in SERVING:
        config["inference"] = {
            "node_id": f"{name}-node-1",
            "hospital_id": name,
            "port": free_port(),
            "probe_port": free_port(),
            "model": {"name": str(root / "base-model")},
            "device": "cpu",
            "adapter_dir": "adapter",
            "reload_interval_s": 1,
            "tls": {
                "cert_file": "credentials/node.crt",
                "key_file": "credentials/node.key",
                "client_ca_file": "credentials/ca.crt",
            },
        }
    path = folder / "hospital.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def flow_times() -> dict[str, float]:
    """Wall seconds of each step of the flow, in the order the steps ran."""
    return {}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, flow_times):
    """The operator's credentials, bundles and base model; the SuperLink; three hospitals."""
    root = tmp_path_factory.mktemp("deployment")
    credentials = root / "credentials"
    deployment = Federation(root)
    port, control_port = free_port(), free_port()
    deployment.address = f"127.0.0.1:{port}"  # the public front: SuperNodes' Fleet API only
    # the researcher reaches the Control API on the SuperLink's loopback port
    deployment.control = f"127.0.0.1:{control_port}"
    try:
        with timed(flow_times, "credentials"):
            everyone = [*HOSPITALS, "rogue"]
            named = [arg for name in everyone for arg in ("--hospital", name)]
            done = deployment.cli("certs", "init", "--out", str(credentials), *named)
            assert done.returncode == 0, done.stderr
            for name in everyone:
                bundle = root / name / "credentials"
                args = ["--out", str(credentials), "--hospital", name, "--to", str(bundle)]
                done = deployment.cli("certs", "bundle", *args)
                assert done.returncode == 0, done.stderr
        with timed(flow_times, "base_model"):
            model = ["--config", str(_model_yaml(root)), "--out", str(root / "base-model")]
            done = deployment.cli("model", "build", *model)
            assert done.returncode == 0, done.stderr
            assert "base model sha256: " in done.stdout
        ca_cert = credentials / "ca" / "ca.crt"
        write_flower_connection(root / "researcher", "consortium", deployment.control, ca_cert)
        with timed(flow_times, "superlink"):
            registered = [arg for name in HOSPITALS for arg in ("--hospital", name)]
            deployment.start(
                "superlink",
                "superlink",
                "start",
                "--credentials",
                str(credentials),
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
            name: _hospital_yaml(root, name, deployment.address, cap)
            for name, cap in [*HOSPITALS.items(), ("rogue", 10.0)]
        }
        with timed(flow_times, "hospitals"):
            for name in HOSPITALS:
                config = str(deployment.configs[name])
                deployment.start(name, "hospital", "start", "--config", config)
            deployment.wait_for_activations(len(HOSPITALS))
            for name in SERVING:
                # printed once the inference server answers its probe: no adapter yet
                where = deployment.inference_url(name).removeprefix("https://")
                deployment.wait_for_output(name, f"inference server on {where}: ", 300)
        yield deployment
    finally:
        deployment.stop_all()


@pytest.fixture(scope="module")
def finished_run(federation, flow_times):
    """One 2-round run in which `west` is killed once it has charged its ledger for round 1.

    Flower starts a ClientApp process per message, so runs cost minutes on a small machine:
    the normal path (north, south) and the drop-out path (west) share this one run.
    """
    with timed(flow_times, "run_1"):
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


@pytest.fixture(scope="module")
def served(federation, finished_run, flow_times):
    """Each inference server's health and a completion once it serves run 1's adapter."""
    _, report = finished_run
    digest = _weights_sha(Path(report["published_adapter"]))
    with timed(flow_times, "adapter_served"):
        return {name: federation.serving(name, digest) for name in SERVING}


@pytest.fixture(scope="module")
def restarted(federation, served, flow_times):
    """`west`, killed in run 1, started again as its service manager would."""
    before = federation.activations()
    with timed(flow_times, "hospital_restart"):
        config = str(federation.configs["west"])
        federation.start("west", "hospital", "start", "--config", config)
        federation.wait_for_activations(before + 1)


@pytest.fixture(scope="module")
def second_run(federation, restarted, flow_times):
    """A second run of all three hospitals, on the same ledgers."""
    with timed(flow_times, "run_2"):
        run = federation.run("deployed2", timeout_s=300)
        assert run.wait(timeout=900) == 0, federation.output("deployed2")[-4000:]
    run_dir = federation.root / "runs" / "deployed2"
    return run_dir, json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def redelivered(federation, second_run, flow_times):
    """`fedllm deliver` of run 2 once north's inference server has lost its adapter, with the
    ledgers' lengths before it."""
    run_dir, _ = second_run
    shutil.rmtree(federation.root / "north" / "adapter")
    charged = {name: len(federation.ledger(name).history()) for name in HOSPITALS}
    with timed(flow_times, "redelivery"):
        done = federation.cli("deliver", str(run_dir), "--federation", "consortium", "--json")
    return done, charged


def _weights_sha(directory: Path) -> str:
    return hashlib.sha256((directory / ADAPTER_WEIGHTS).read_bytes()).hexdigest()


def _run_id(run_dir: Path) -> str:
    return (run_dir / RUN_ID_FILE).read_text().strip()


def _epsilon_after(ledger: NodePrivacyLedger, run_id: str) -> float:
    """The ledger's ε right after the last event the run ``run_id`` charged."""
    return [r for r in ledger.history() if r["run_id"] == run_id][-1]["epsilon_after"]


def _composed_epsilon(events: list[dict]) -> float:
    """ε of the recorded events composed by dp_accounting's PLD accountant for replace-one
    neighbours at the ledger's δ, independently of fedllm's accountant: the repeats of each
    mechanism (same parameters and purpose) as one self-composition, in order of appearance."""
    repeats: Counter[tuple] = Counter()
    for event in events:
        mechanism = tuple(sorted((k, v) for k, v in event.items() if k not in ("steps", "count")))
        repeats[mechanism] += event.get("steps", event.get("count"))
    accountant = dp_accounting.pld.PLDAccountant(
        dp_accounting.NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-4
    )
    for mechanism, times in repeats.items():
        parameters = dict(mechanism)
        gaussian = dp_accounting.GaussianDpEvent(parameters["noise_multiplier"])
        if parameters["kind"] == "sampled_gaussian_steps":
            step = dp_accounting.PoissonSampledDpEvent(parameters["sample_rate"], gaussian)
            accountant.compose(step, times)
        else:
            assert parameters["kind"] == "gaussian_release", parameters
            accountant.compose(gaussian, times)
    return accountant.get_epsilon(DELTA)


def test_superlink_registered_the_hospitals_keys(federation):
    output = federation.output("superlink")
    for name in HOSPITALS:
        assert f"hospital {name}: registered" in output
    log = (federation.root / "superlink" / "superlink.log").read_text()
    assert "SuperNode authentication is disabled" not in log  # Flower warns when it is off


def test_the_operators_bundles_hold_what_hospital_yaml_names(federation):
    for name in HOSPITALS:
        bundle = federation.root / name / "credentials"
        modes = {path.name: path.stat().st_mode & 0o777 for path in bundle.iterdir()}
        assert set(modes) == {"ca.crt", "auth_key", "auth_key.pub", "node.crt", "node.key"}
        assert modes["auth_key"] == modes["node.key"] == 0o600
        assert bundle.stat().st_mode & 0o777 == 0o700


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
    run_id = _run_id(run_dir)
    for name, state in reported.items():
        assert state["epsilon_cap"] == HOSPITALS[name]  # the cap from its hospital.yaml
        assert 0 < state["epsilon"] <= HOSPITALS[name]
        # a lost hospital's ε is its own projection for the round it charged: unconfirmed,
        # and equal to what its ledger reached
        assert state["epsilon_confirmed"] is (name not in first["lost"])
        if name in first["lost"]:
            ledger = federation.ledger(name)
            assert _epsilon_after(ledger, run_id) == pytest.approx(state["epsilon"])
    for name in ("north", "south"):
        state = report["privacy"]["hospitals"][name]
        assert state["rounds_participated"] == 2
        ledger = federation.ledger(name)
        assert _epsilon_after(ledger, run_id) == pytest.approx(state["epsilon"])
    # the hospitals' ledgers live where hospital.yaml put them, not in the run directory
    assert not (run_dir / "hospitals").exists()


def test_server_ledger_mirrors_every_hospital_ledger_the_killed_one_included(
    federation, finished_run
):
    run_dir, _ = finished_run
    server = ServerLedger(f"sqlite:///{run_dir / 'server.db'}")
    for name in HOSPITALS:
        history = federation.ledger(name).history()
        run_id = _run_id(run_dir)
        assert run_id.startswith("deployed-")
        charged = [r["event"] for r in history if r["run_id"] == run_id]
        mirrored = [event_to_dict(e) for e in server.hospital_events("deployed", name)]
        assert charged, name
        assert charged == mirrored, name
        rounds = {r["round_id"] for r in history if r["run_id"] == run_id}
        # round 0: the noised evaluation of the base model, before round 1
        assert rounds == ({0, 1} if name == "west" else {0, 1, 2})


def test_the_run_delivers_its_adapter_to_both_inference_servers_which_serve_it(
    federation, finished_run, served
):
    run_dir, report = finished_run
    published = Path(report["published_adapter"])
    digest = _weights_sha(published)
    # west was killed before the end: only the connected hospitals get the adapter
    assert report["adapter_delivery"] == {
        "adapter_sha256": digest,
        "delivered": list(SERVING),
        "skipped": [],
        "refused": [],
    }
    for name in SERVING:
        assert _weights_sha(federation.root / name / "adapter") == digest
        health, completion = served[name]
        assert health["status"] == "ok"
        assert health["adapter"]["version"] == digest[:12]
        assert health["adapter"]["dp_record"]["run_id"] == run_dir.name
        assert completion["system_fingerprint"] == digest[:12]
        assert completion["choices"][0]["text"] is not None


def test_a_second_run_composes_with_the_first_in_every_hospital_ledger(
    federation, finished_run, second_run
):
    first_dir, _ = finished_run
    run_dir, report = second_run
    assert report["status"] == "completed", report.get("error")
    for row in report["rounds"]:
        assert row["selected"] == sorted(HOSPITALS)  # west is back
    first, second = _run_id(first_dir), _run_id(run_dir)
    for name in HOSPITALS:
        ledger = federation.ledger(name)
        history = ledger.history()
        assert [r["run_id"] for r in history] == sorted(
            (r["run_id"] for r in history), key=[first, second].index
        )
        assert {r["run_id"] for r in history} == {first, second}
        # ε after both runs is dp_accounting's composition of every event the ledger recorded
        assert ledger.spent_epsilon() == _composed_epsilon([r["event"] for r in history])
        assert ledger.spent_epsilon() > _epsilon_after(ledger, first)
        assert ledger.spent_epsilon() <= HOSPITALS[name]
    # run 2's adapter reaches both inference servers; west runs none and is skipped
    assert report["adapter_delivery"] == {
        "adapter_sha256": _weights_sha(Path(report["published_adapter"])),
        "delivered": list(SERVING),
        "skipped": ["west"],
        "refused": [],
    }


def test_fedllm_deliver_delivers_the_published_adapter_again_charging_nothing(
    federation, second_run, redelivered
):
    run_dir, report = second_run
    done, charged = redelivered
    assert done.returncode == 0, done.stderr[-3000:]
    digest = _weights_sha(Path(report["published_adapter"]))
    outcome = json.loads(done.stdout)
    assert outcome["adapter_sha256"] == digest
    assert outcome["delivered"] == list(SERVING)
    assert outcome["skipped"] == ["west"]
    assert outcome["refused"] == []
    # north's inference server had lost its adapter: it has it again, and serves it
    assert _weights_sha(federation.root / "north" / "adapter") == digest
    health, _ = federation.serving("north", digest)
    assert health["adapter"]["dp_record"]["run_id"] == run_dir.name
    # a delivery releases nothing new: no ledger was charged
    assert {name: len(federation.ledger(name).history()) for name in HOSPITALS} == charged
    # the outcome is recorded beside the run's report, which stays as the run left it
    (record,) = (run_dir / DELIVERIES_DIR).glob("*.json")
    assert json.loads(record.read_text())["delivered"] == list(SERVING)
    assert json.loads((run_dir / "report.json").read_text()) == report


def test_fedllm_deliver_refuses_a_run_whose_adapter_was_published_over(
    federation, finished_run, redelivered
):
    run_dir, _ = finished_run
    done = federation.cli("deliver", str(run_dir), "--federation", "consortium")
    assert done.returncode == 2
    assert "now holds the adapter of run 'deployed2'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    # refused before anything was contacted
    assert not (run_dir / DELIVERIES_DIR).exists()


def test_every_step_of_the_flow_is_timed(
    flow_times, record_property, served, restarted, redelivered
):
    assert list(flow_times) == [
        "credentials",
        "base_model",
        "superlink",
        "hospitals",
        "run_1",
        "adapter_served",
        "hospital_restart",
        "run_2",
        "redelivery",
    ]
    record_property("deploy_flow_s", flow_times)
    target = os.environ.get(TIMINGS_ENV)
    if target:
        load = [round(value, 2) for value in os.getloadavg()]
        total = round(sum(flow_times.values()), 1)
        payload = {"steps_s": flow_times, "total_s": total, "loadavg": load}
        Path(target).write_text(json.dumps(payload, indent=2) + "\n")


def test_registering_the_refused_key_lets_it_join(federation, redelivered):
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
    activations = federation.activations()
    rogue = federation.start(
        "rogue", "hospital", "start", "--config", str(federation.configs["rogue"])
    )
    deadline = time.monotonic() + 60
    while federation.activations() == activations:
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
