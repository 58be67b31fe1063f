"""A hospital's long-lived worker keeps its site (and base model) loaded across rounds.

Real components: ``fedllm hospital worker`` in its own process on a real Unix socket, the real
ClientApp (its ``worker-socket`` forwarding as Flower's ``flwr-clientapp`` would run it), a
tiny local GPT-2, real SQLite ledgers. Whether a message rebuilt the site is read from the
worker's own log (``hospital.site_built``), not from timing.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedllm.clients import client_app
from fedllm.config import validate_config
from fedllm.federation import delivery
from fedllm.federation.deployment import hospital_node_config
from fedllm.federation.experiment import EXPERIMENT, experiment_json
from fedllm.federation.hospital_config import load_hospital_config
from fedllm.federation.node_settings import WORKER_SOCKET
from fedllm.federation.warm_worker import (
    FAILED,
    FRAME_HEADER,
    MAX_FRAME_BYTES,
    wait_until_listening,
    worker_socket_path,
)
from fedllm.models.adapters import adapter_state
from fedllm.models.loading import base_model, load_lora_model

NODE = {"partition-id": 0, "num-partitions": 2}


@pytest.fixture(scope="module", autouse=True)
def _server_identity():
    """Flower stamps messages with the running task's identity; give this module one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskIdentity, "_run_id", 1)
        patch.setattr(TaskIdentity, "_task_id", 1)
        patch.setattr(TaskIdentity, "_node_id", 0)
        yield


def _hospital_yaml(root: Path, **runtime) -> Path:
    (root / "notes.jsonl").write_text(json.dumps({"text": "note"}) + "\n", encoding="utf-8")
    path = root / "hospital.yaml"
    hospital = {
        "hospital": "a",
        "superlink": {"address": "127.0.0.1:9092", "insecure": True},
        "data": {"path": "notes.jsonl"},
        "privacy": {"ledger_url": "sqlite:///ledger.db"},
        "runtime": {"state_dir": "state", **runtime},
    }
    path.write_text(yaml.safe_dump(hospital), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, local_model_dir):
    """A DP experiment of two simulated hospitals on a tiny local model, and a running worker."""
    root = tmp_path_factory.mktemp("ww")
    config = validate_config(
        {
            "run": {"rounds": 5, "seed": 1},
            "federation": {
                "num_hospitals": 2,
                "cohort_size": 2,
                "hospitals": [{"name": "a", "data_size": 100}, {"name": "b", "data_size": 100}],
            },
            "model": {"name": local_model_dir, "max_seq_length": 32},
            "training": {"local_steps": 1, "batch_size": 8, "learning_rate": 0.5},
            "privacy": {"target_epsilon": None, "noise_multiplier": 1.0},
            "evaluation": {"baselines": []},
        }
    )
    hospital_file = _hospital_yaml(root)
    socket_path = worker_socket_path(root / "state")
    log_path = root / "worker.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedllm.cli", "hospital", "worker", "--config", hospital_file],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, FEDLLM_LOG_JSON="1"),
        )
    try:
        assert wait_until_listening(socket_path, 120, lambda: process.poll() is None)
        global_adapter = adapter_state(load_lora_model(config.model, torch.device("cpu")))
        yield {
            "root": root,
            # the experiment travels in each message; neither process reads an experiment file
            "run_config": {},
            "experiment": experiment_json(config),
            "socket": socket_path,
            "log": log_path,
            "process": process,
            "sha256": base_model(config.model).sha256,
            "adapter": global_adapter,
        }
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert not socket_path.exists()  # a stopped worker leaves no socket behind


def _context(setup, **node) -> Context:
    node_config = {**NODE, WORKER_SOCKET: str(setup["socket"]), **node}
    return Context(1, 11, node_config, RecordDict(), setup["run_config"])


def _message(setup, kind: str, run_dir: str = "run", **config) -> Message:
    settings = {
        "run-dir": str(setup["root"] / run_dir),
        "run-id": "r",
        "base-model-sha256": setup["sha256"],
        EXPERIMENT: setup["experiment"],
        **config,
    }
    content = RecordDict({"config": ConfigRecord(settings)})
    if kind == "train":
        content["arrays"] = ArrayRecord(setup["adapter"])
    return Message(content, dst_node_id=11, message_type=kind)


def _events(setup, name: str) -> list[dict]:
    events = []
    for line in setup["log"].read_text(encoding="utf-8").splitlines():
        if line.startswith("{") and json.loads(line).get("event") == name:
            events.append(json.loads(line))
    return events


def _adapter(reply: Message) -> dict[str, torch.Tensor]:
    return reply.content["arrays"].to_torch_state_dict()


def _differ(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(first[name], second[name]) for name in first)


def test_two_train_messages_reuse_the_site_and_draw_fresh_noise(setup):
    sites_before = dict(client_app._SITES)  # other tests of this process may have built some
    replies = []
    for server_round in (1, 2):
        message = _message(setup, "train", **{"server-round": server_round})
        reply = client_app.app(message, _context(setup))
        assert not reply.has_error(), reply.error.reason
        assert reply.metadata.reply_to_message_id == message.metadata.message_id
        assert set(reply.content.keys()) == {"arrays", "metrics", "privacy"}
        replies.append(reply)
    assert sites_before == client_app._SITES  # this process forwarded; it never built a site
    assert len(_events(setup, "hospital.site_built")) == 1  # the second round found it loaded
    assert len(_events(setup, "hospital.trained")) == 2
    first, second = (reply.content["metrics"] for reply in replies)
    assert second["rounds-participated"] == first["rounds-participated"] + 1
    # the same global adapter in, two different noised adapters out: noise is drawn per round
    assert _differ(_adapter(replies[0]), _adapter(replies[1]))


def test_the_worker_does_not_draw_its_noise_from_the_config(setup):
    """A cold site in this process, given the worker's first round (same config, run.seed,
    round, run id and adapter), trains to a different adapter: nothing seeds from those."""
    warm = client_app.app(_message(setup, "train", "warm", **{"server-round": 1}), _context(setup))
    cold_context = Context(1, 11, dict(NODE), RecordDict(), setup["run_config"])
    cold = client_app.train(_message(setup, "train", "cold", **{"server-round": 1}), cold_context)
    assert not warm.has_error()
    assert not cold.has_error()
    assert _differ(_adapter(warm), _adapter(cold))
    client_app._SITES.clear()


def _raw_request(path: Path, payload: bytes) -> tuple[bytes, bytes]:
    """Send raw bytes to the worker; the status byte and the rest of what it answered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(30)
        connection.connect(str(path))
        connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer[:1], answer[1 + FRAME_HEADER.size :]


def test_garbage_and_oversized_frames_are_refused_and_the_worker_survives(setup):
    oversized = FRAME_HEADER.pack(MAX_FRAME_BYTES + 1)
    status, reason = _raw_request(setup["socket"], oversized)
    assert status == FAILED
    assert b"over the" in reason
    garbage = b"\xff\xfe not protobuf \x00\x01"
    status, reason = _raw_request(setup["socket"], 2 * (FRAME_HEADER.pack(len(garbage)) + garbage))
    assert status == FAILED
    assert b"not a Flower message" in reason
    status, _ = _raw_request(setup["socket"], FRAME_HEADER.pack(10) + b"short")
    assert status == FAILED
    assert setup["process"].poll() is None
    # three refusals: the fixture's probe (connect, close) that the worker listens is none
    assert len(_events(setup, "warm_worker.refused")) == 3
    reply = client_app.app(_message(setup, "query"), _context(setup))
    assert not reply.has_error(), reply.error.reason
    assert reply.content["status"]["hospital"] == "a"


def test_socket_is_0600_in_a_0700_directory(setup):
    assert stat.S_ISSOCK(setup["socket"].stat().st_mode)
    assert stat.S_IMODE(setup["socket"].stat().st_mode) == 0o600
    assert stat.S_IMODE(setup["socket"].parent.stat().st_mode) == 0o700


def test_a_dead_worker_is_a_one_line_error_reply_never_a_cold_round(setup):
    context = _context(setup, **{WORKER_SOCKET: str(setup["root"] / "gone" / "worker.sock")})
    sites_before = dict(client_app._SITES)
    reply = client_app.app(_message(setup, "train", **{"server-round": 3}), context)
    assert reply.has_error()
    assert "not reachable" in reply.error.reason
    assert "\n" not in reply.error.reason
    assert sites_before == client_app._SITES


def test_hospital_start_names_the_worker_socket_unless_turned_off(tmp_path):
    hospital = load_hospital_config(_hospital_yaml(tmp_path))
    assert hospital_node_config(hospital)[WORKER_SOCKET] == str(
        tmp_path / "state" / "worker" / "worker.sock"
    )
    cold = load_hospital_config(_hospital_yaml(tmp_path, warm_worker=False))
    assert WORKER_SOCKET not in hospital_node_config(cold)


def test_the_deliver_action_is_the_one_the_server_sends():
    assert client_app.DELIVER_ACTION == delivery.DELIVER_ACTION


def test_a_forwarding_client_app_process_does_not_import_pytorch():
    """Flower imports the ClientApp afresh for every message: forwarding must stay cheap."""
    probe = (
        "import sys, fedllm.clients.client_app; print(sorted({'torch', 'peft'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
