"""The federation delivers its published DP adapter to every hospital's inference server.

A real (simulated-transport) run: the ServerApp's federation loop drives the real ClientApp
handlers of two hospitals (query, train, evaluate, then ``query.deliver``) through a grid that
calls them in-process, each hospital with its own ``adapter-dir``. Both install the adapter,
a real inference server (the node app on loopback) serves it, and a hospital refuses an
adapter of another base model or with tampered weights, in one line, writing nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx
import pytest
import yaml
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_node_server import TINY, node_config
from test_preflight import _base

from fedllm.clients.client_app import deliver, evaluate, status, train
from fedllm.config import load_config, validate_config
from fedllm.federation.array_packing import packed_arrays_mod
from fedllm.federation.delivery import (
    ACK_RECORD,
    ADAPTER_RECORD,
    ADAPTER_WEIGHTS,
    DELIVER_MESSAGE,
    DELIVER_REQUEST,
    NothingToDeliverError,
    deliver_adapter,
    delivery_content,
    published_adapter,
    read_delivery,
)
from fedllm.federation.deployment import hospital_node_config
from fedllm.federation.experiment import EXPERIMENT, experiment_json
from fedllm.federation.hospital_config import HospitalConfig
from fedllm.federation.node_settings import ADAPTER_DIR
from fedllm.federation.run_identity import RUN_ID_FILE
from fedllm.models.checkpoints import read_artifact, write_artifact
from fedllm.models.dp_record import DP_RECORD_FILE, parse_dp_record
from fedllm.models.loading import base_model
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.run_report import RunReport, read_report_json
from fedllm.security.encryption import EncryptionError, KeyRing
from fedllm.security.environment import FILE_ENV_VAR
from fedllm.serving.node.app import create_node_app
from fedllm.serving.node.generation import ModelBackend
from fedllm.serving.node.server import BackgroundServer
from fedllm.strategies.server_app import deliver_again, run_federation
from fedllm.strategies.transport_grid import TransportGrid

HANDLERS = {"query": status, "train": train, "evaluate": evaluate, DELIVER_MESSAGE: deliver}


class HandlerGrid:
    """Flower's Grid as the ServerApp uses it, delivering every message to the real ClientApp
    handler its type routes to (through the ClientApp's array-packing mod), in a context with
    that node's own node config. Replies wait to be pulled, as on a SuperLink."""

    def __init__(self, run_config: dict, node_configs: dict[int, dict]) -> None:
        self.nodes = node_configs
        self.contexts = {
            node_id: Context(1, node_id, node_config, RecordDict(), run_config)
            for node_id, node_config in node_configs.items()
        }
        self.sent: list[str] = []
        self.replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        message_ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's push
            kind = message.metadata.message_type
            self.sent.append(kind)
            context = self.contexts[message.metadata.dst_node_id]
            self.replies.append(packed_arrays_mod(message, context, HANDLERS[kind]))
            message_ids.append(message.metadata.message_id)
        return message_ids

    def pull_messages(self, message_ids) -> list[Message]:
        wanted = set(message_ids)
        ready = [r for r in self.replies if r.metadata.reply_to_message_id in wanted]
        self.replies = [r for r in self.replies if r.metadata.reply_to_message_id not in wanted]
        return ready

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture(scope="module", autouse=True)
def _server_identity():
    """Flower stamps messages with the running task's identity; give this module one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskIdentity, "_run_id", 1)
        patch.setattr(TaskIdentity, "_task_id", 1)
        patch.setattr(TaskIdentity, "_node_id", 0)
        yield


@pytest.fixture(scope="module")
def delivered(tmp_path_factory):
    """One DP run of two hospitals that publishes its adapter and delivers it to both."""
    root = tmp_path_factory.mktemp("delivery")
    raw = _base(root)
    raw["run"] |= {"name": "delivered", "rounds": 1, "publish_adapter_dir": "published"}
    config = validate_config({**raw, "model": TINY.model_dump(mode="json")})
    config_file = root / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    run_dir = root / "runs" / "delivered"
    run_dir.mkdir(parents=True)
    adapter_dirs = {name: root / name / "adapter" for name in ("a", "b")}
    nodes = {
        11 + index: {"partition-id": index, "num-partitions": 2, ADAPTER_DIR: str(directory)}
        for index, directory in enumerate(adapter_dirs.values())
    }
    grid = HandlerGrid({}, nodes)
    ledger = ServerLedger(f"sqlite:///{run_dir / 'server.db'}")
    ledger.start_run(run_dir.name, config.model_dump_json())
    run_federation(  # through the ServerApp's transport, as its main() does
        TransportGrid(grid),
        config,
        run_dir,
        RunReport(run_dir, config),
        ledger,
        completed=0,
        keyring=None,
    )
    return {
        "grid": grid,
        "run_dir": run_dir,
        "published": root / "runs" / "published",
        "adapter_dirs": adapter_dirs,
        "report": read_report_json(run_dir),
        "config_file": config_file,
    }


def _weights_sha(directory: Path) -> str:
    return hashlib.sha256(read_artifact(directory / ADAPTER_WEIGHTS, keyring=None)).hexdigest()


def test_a_dp_run_delivers_its_published_adapter_to_both_hospitals(delivered):
    assert delivered["grid"].sent[-2:] == [DELIVER_MESSAGE, DELIVER_MESSAGE]
    published = delivered["published"]
    digest = _weights_sha(published)
    record = parse_dp_record(read_artifact(published / DP_RECORD_FILE, keyring=None))
    assert record.adapter_sha256 == digest
    for directory in delivered["adapter_dirs"].values():
        assert _weights_sha(directory) == digest
        assert read_artifact(directory / DP_RECORD_FILE, keyring=None) == read_artifact(
            published / DP_RECORD_FILE, keyring=None
        )
        assert not directory.with_name("adapter.staging").exists()
    report = delivered["report"]
    assert report["status"] == "completed"
    assert report["adapter_delivery"] == {
        "adapter_sha256": digest,
        "delivered": ["a", "b"],
        "skipped": [],
        "refused": [],
    }


def test_a_real_inference_server_serves_the_delivered_adapter(delivered):
    directory = delivered["adapter_dirs"]["a"]
    backend = ModelBackend(TINY, adapter_dir=directory, reload_interval_s=0, device="cpu")
    app = create_node_app(node_config(backend="model", adapter_dir=str(directory)), backend)
    with BackgroundServer(app) as server:
        health = httpx.get(f"{server.url}/v1/health", timeout=10).json()
        assert health["model_version"] == _weights_sha(directory)[:12]
        answer = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "Question: chest pain. Answer:", "max_tokens": 2},
            timeout=30,
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["system_fingerprint"] == _weights_sha(directory)[:12]


def _delivery(delivered, content: RecordDict, node: dict) -> Message:
    context = Context(1, 21, node, RecordDict(), {})
    return deliver(Message(content, dst_node_id=21, message_type=DELIVER_MESSAGE), context)


def _context(delivered) -> dict[str, str]:
    run_dir = delivered["run_dir"]
    sha = base_model(TINY).sha256
    return {
        "run-dir": str(run_dir),
        "run-id": run_dir.name,
        "base-model-sha256": sha,
        EXPERIMENT: experiment_json(load_config(delivered["config_file"])),
    }


def test_a_hospital_on_another_base_model_refuses_in_one_line(delivered, tmp_path):
    published = tmp_path / "published"
    published.mkdir()
    for name in ("adapter_config.json", ADAPTER_WEIGHTS, DP_RECORD_FILE):
        data = read_artifact(delivered["published"] / name, keyring=None)
        write_artifact(published / name, data, keyring=None)
    record = parse_dp_record(read_artifact(published / DP_RECORD_FILE, keyring=None))
    foreign = {**record.base_model, "sha256": "c" * 64}
    write_artifact(
        published / DP_RECORD_FILE,
        record.model_copy(update={"base_model": foreign}).to_bytes(),
        keyring=None,
    )
    target = tmp_path / "adapter"
    node = {"partition-id": 0, "num-partitions": 2, ADAPTER_DIR: str(target)}
    reply = _delivery(
        delivered, delivery_content(published, _context(delivered), keyring=None), node
    )
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith("hospital a: DeliveryRefusedError: refused the delivered adapter: ")
    assert "trained on base model cccccccccccc" in reason
    assert "\n" not in reason
    assert not target.exists()

    # the server's own hash differs from this hospital's: refused before anything is read
    other_server = {**_context(delivered), "base-model-sha256": "d" * 64}
    reply = _delivery(
        delivered, delivery_content(delivered["published"], other_server, keyring=None), node
    )
    assert reply.error.reason.startswith(
        "hospital a: BaseModelMismatchError: the server's base model is dddddddddddd"
    )
    assert not target.exists()


def test_tampered_weights_are_refused_and_nothing_is_written(delivered, tmp_path):
    content = delivery_content(delivered["published"], _context(delivered), keyring=None)
    weights = bytearray(content[ADAPTER_RECORD][ADAPTER_WEIGHTS])
    weights[-1] ^= 0x01
    content[ADAPTER_RECORD][ADAPTER_WEIGHTS] = bytes(weights)
    target = tmp_path / "adapter"
    node = {"partition-id": 1, "num-partitions": 2, ADAPTER_DIR: str(target)}
    reply = _delivery(delivered, content, node)
    assert reply.has_error()
    assert "describes other weights" in reply.error.reason
    assert reply.error.reason.startswith("hospital b: DeliveryRefusedError:")
    assert not target.exists()


def test_the_client_app_encrypts_a_delivery_with_the_key_file_of_its_environment(
    delivered, tmp_path, monkeypatch
):
    """The ClientApp is an entry point: it reads FEDLLM_ENCRYPTION_KEY_FILE itself and hands
    the key ring to the code that writes the adapter, which never looks at the environment."""
    key_file = tmp_path / "keys.json"
    keyring = KeyRing.generate("k1")
    keyring.save(key_file)
    monkeypatch.setenv(FILE_ENV_VAR, str(key_file))
    target = tmp_path / "adapter"
    node = {"partition-id": 0, "num-partitions": 2, ADAPTER_DIR: str(target)}
    content = delivery_content(delivered["published"], _context(delivered), keyring=None)
    reply = _delivery(delivered, content, node)
    assert not reply.has_error(), reply.error.reason
    assert b"run_id" not in (target / DP_RECORD_FILE).read_bytes()
    assert (
        _weights_sha(delivered["published"])
        == hashlib.sha256(read_artifact(target / ADAPTER_WEIGHTS, keyring=keyring)).hexdigest()
    )
    with pytest.raises(EncryptionError, match="is encrypted"):
        read_artifact(target / ADAPTER_WEIGHTS, keyring=None)


def test_a_hospital_without_an_inference_server_is_skipped_not_refused(delivered):
    """Training-only (and simulated) hospitals have no adapter directory: they acknowledge with
    an empty hash, which the server lists as skipped, writing nothing."""
    content = delivery_content(delivered["published"], _context(delivered), keyring=None)
    reply = _delivery(delivered, content, {"partition-id": 0, "num-partitions": 2})
    assert not reply.has_error()
    assert dict(reply.content[ACK_RECORD]) == {"hospital": "a", "adapter-sha256": ""}


def test_hospital_yaml_inference_adapter_dir_reaches_the_node_config(tmp_path):
    hospital = HospitalConfig.model_validate(
        {
            "hospital": "a",
            "superlink": {"address": "127.0.0.1:9092", "insecure": True},
            "data": {"path": str(tmp_path / "a.jsonl")},
            "privacy": {"ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}"},
            "inference": node_config(
                hospital_id="a", adapter_dir=str(tmp_path / "adapter")
            ).model_dump(mode="json"),
        }
    )
    assert hospital_node_config(hospital)[ADAPTER_DIR] == str(tmp_path / "adapter")


def test_resuming_a_finished_run_trains_nothing_and_delivers_again(delivered):
    """On demand: starting a finished run again on its run directory (what ``fedllm resume``
    does) skips every round and delivers the published adapter once more."""
    run_dir = delivered["run_dir"]
    config = load_config(delivered["config_file"])
    target = delivered["adapter_dirs"]["b"]
    shutil.rmtree(target)
    grid = HandlerGrid({}, delivered["grid"].nodes)
    ledger = ServerLedger(f"sqlite:///{run_dir / 'server.db'}")
    completed = ledger.resume_state(run_dir.name).last_completed_round
    assert completed == config.run.rounds
    report = RunReport.resume(run_dir, config, completed)
    transport = TransportGrid(grid)
    run_federation(transport, config, run_dir, report, ledger, completed=completed, keyring=None)
    assert grid.sent == ["query", "query", DELIVER_MESSAGE, DELIVER_MESSAGE]
    assert _weights_sha(target) == _weights_sha(delivered["published"])
    assert read_report_json(run_dir)["adapter_delivery"]["delivered"] == ["a", "b"]


def test_hospitals_record_the_runs_unique_id_not_its_directory_name(delivered):
    run_dir = delivered["run_dir"]
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert run_id.startswith("delivered-")
    assert run_id != run_dir.name
    ledger = NodePrivacyLedger(
        f"sqlite:///{run_dir / 'hospitals' / 'a' / 'ledger.db'}", "a", epsilon_cap=8.0, delta=1e-5
    )
    history = ledger.history()
    assert history
    assert {row["run_id"] for row in history} == {run_id}


def test_a_hospital_without_an_inference_server_counts_as_answered(delivered):
    """A skipped hospital answered: it is not also reported as one that did not answer."""
    nodes = {
        11: {"partition-id": 0, "num-partitions": 2},
        12: {
            "partition-id": 1,
            "num-partitions": 2,
            ADAPTER_DIR: str(delivered["adapter_dirs"]["b"]),
        },
    }
    grid = HandlerGrid({}, nodes)
    outcome = deliver_adapter(
        grid, delivered["published"], _context(delivered), timeout=None, keyring=None
    )
    assert outcome.summary() == {
        "adapter_sha256": _weights_sha(delivered["published"]),
        "delivered": ["b"],
        "skipped": ["a"],
        "refused": [],
    }


def test_the_published_adapter_of_a_run_is_found_and_checked(delivered, tmp_path):
    run_dir = delivered["run_dir"]
    assert published_adapter(run_dir, keyring=None) == delivered["published"]
    with pytest.raises(NothingToDeliverError, match=r"has no report\.json: not a run directory"):
        published_adapter(tmp_path, keyring=None)
    # a truncated report (a crash mid-write elsewhere, a wrong file): one line, no traceback
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "report.json").write_text(json.dumps(delivered["report"])[:40])
    with pytest.raises(NothingToDeliverError, match=r"report\.json cannot be read: "):
        published_adapter(truncated, keyring=None)
    # a run that published nothing
    unpublished = tmp_path / "unpublished"
    unpublished.mkdir()
    report = {**delivered["report"], "published_adapter": None}
    (unpublished / "report.json").write_text(json.dumps(report))
    with pytest.raises(NothingToDeliverError, match="the run published no DP adapter"):
        published_adapter(unpublished, keyring=None)
    # another run of the same experiment published over it: its adapter is not this run's
    later = tmp_path / "later"
    later.mkdir()
    (later / "report.json").write_text(json.dumps(delivered["report"]))
    with pytest.raises(NothingToDeliverError, match="now holds the adapter of run 'delivered'"):
        published_adapter(later, keyring=None)


def test_published_weights_the_dp_record_does_not_describe_are_not_delivered(delivered, tmp_path):
    run_dir = tmp_path / "delivered"
    run_dir.mkdir()
    published = tmp_path / "published"
    shutil.copytree(delivered["published"], published)
    weights = bytearray(read_artifact(published / ADAPTER_WEIGHTS, keyring=None))
    weights[-1] ^= 0x01
    write_artifact(published / ADAPTER_WEIGHTS, bytes(weights), keyring=None)
    report = {**delivered["report"], "published_adapter": str(published)}
    (run_dir / "report.json").write_text(json.dumps(report))
    with pytest.raises(NothingToDeliverError, match="describes other weights"):
        published_adapter(run_dir, keyring=None)


def test_a_delivery_only_run_sends_only_the_delivery_and_records_its_outcome(delivered):
    """What `fedllm deliver` asks of the ServerApp: the end-of-run message, nothing charged."""
    run_dir = delivered["run_dir"]
    config = load_config(delivered["config_file"])
    grid = HandlerGrid({}, delivered["grid"].nodes)
    ledger = NodePrivacyLedger(
        f"sqlite:///{run_dir / 'hospitals' / 'a' / 'ledger.db'}", "a", epsilon_cap=8.0, delta=1e-5
    )
    charged = ledger.history()
    run_config = {EXPERIMENT: experiment_json(config), "run-dir": str(run_dir)}
    deliver_again(TransportGrid(grid), {**run_config, DELIVER_REQUEST: "0a1b"}, "0a1b")
    assert grid.sent == [DELIVER_MESSAGE, DELIVER_MESSAGE]
    recorded = read_delivery(run_dir, "0a1b")
    assert recorded is not None
    assert recorded["delivered"] == ["a", "b"]
    assert recorded["adapter_sha256"] == _weights_sha(delivered["published"])
    assert ledger.history() == charged
