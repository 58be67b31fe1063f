"""The base model has one identity, a content hash, and every party checks it.

The embedded tiny model is built from its own config only (never ``run.seed``), recorded with
its hash beside it, re-verified on load, and shipped as a directory (``fedllm model build``).
A hospital whose base model is not the server's refuses before its ledger is opened, and an
inference server refuses an adapter trained on another base model, saying so in health.
Real components: the tiny model built once for this module in its own cache, the ClientApp's
handlers, the ServerApp's federation loop, ModelBackend and the node's HTTP app on loopback.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import httpx
import pytest
import structlog
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from structlog.testing import capture_logs
from test_node_server import TINY, node_config, write_adapter
from test_preflight import ClientAppGrid, _base, _server_identity  # noqa: F401 (fixture)
from typer.testing import CliRunner

from fedllm.cli.app import app as cli_app
from fedllm.clients.client_app import status as status_handler
from fedllm.config import validate_config
from fedllm.config.schema import ExperimentConfig, ModelConfig
from fedllm.federation.experiment import EXPERIMENT, experiment_json
from fedllm.federation.hospital import BaseModelMismatchError, HospitalSite
from fedllm.models.checkpoints import read_artifact, write_artifact
from fedllm.models.dp_record import DP_RECORD_FILE, parse_dp_record
from fedllm.models.identity import (
    BASE_MODEL_FILE,
    BaseModelIdentityError,
    combined_sha256,
    hash_model_files,
    verify_identity,
)
from fedllm.models.loading import ModelLoadError, base_model, load_base_model
from fedllm.models.tiny import tiny_model_dir
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.run_report import RunReport, read_report_json
from fedllm.serving.node.app import create_node_app
from fedllm.serving.node.generation import ModelBackend
from fedllm.serving.node.server import BackgroundServer
from fedllm.strategies.server_app import run_federation

REPO = Path(__file__).resolve().parents[1]
MODEL = TINY.model_dump(mode="json")
HASH_KEY = "base-model-sha256"


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """A model cache private to this module: its tiny model is built here, exactly once."""
    previous = os.environ.get("FEDLLM_CACHE_DIR")
    root = tmp_path_factory.mktemp("model-cache")
    os.environ["FEDLLM_CACHE_DIR"] = str(root)
    structlog.reset_defaults()
    with capture_logs() as logs:
        identity = base_model(TINY)
    assert [e["event"] for e in logs].count("tiny_model.built") == 1
    yield identity
    if previous is None:
        os.environ.pop("FEDLLM_CACHE_DIR", None)
    else:
        os.environ["FEDLLM_CACHE_DIR"] = previous


def _experiment(seed: int, **model) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"run": {"seed": seed}, "model": {**MODEL, **model}})


# --- the tiny model depends on its own config only ----------------------------------------------


def test_the_cache_key_and_the_model_do_not_depend_on_run_seed(model_cache):
    one, two = _experiment(1), _experiment(2)
    assert tiny_model_dir(one.model.tiny) == tiny_model_dir(two.model.tiny)
    with capture_logs() as logs:
        first, second = base_model(one.model), base_model(two.model)
    assert not [e for e in logs if e["event"] == "tiny_model.built"]  # built once, by the fixture
    assert first.sha256 == second.sha256 == model_cache.sha256
    assert first.path == second.path == str(tiny_model_dir(one.model.tiny))
    # the build seed is part of the model's own config, and does change its key
    other = _experiment(1, tiny={**MODEL["tiny"], "build_seed": 1})
    assert tiny_model_dir(other.model.tiny) != tiny_model_dir(one.model.tiny)


# --- one identity: a content hash, recorded, re-verified ---------------------------------------


def test_the_hash_is_stable_across_loads_and_changes_with_one_weight_byte(model_cache, tmp_path):
    directory = Path(model_cache.path)
    store = directory / BASE_MODEL_FILE
    assert verify_identity(directory, "tiny", store).sha256 == model_cache.sha256
    assert verify_identity(directory, "tiny", store).sha256 == model_cache.sha256
    assert set(model_cache.files) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }

    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    local = ModelConfig.model_validate({**MODEL, "name": str(copy)})
    assert base_model(local).sha256 == model_cache.sha256  # same files, same identity
    load_base_model(local, torch.device("cpu"))

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert combined_sha256(hash_model_files(copy)) != model_cache.sha256
    with pytest.raises(BaseModelIdentityError, match=r"model\.safetensors has changed"):
        verify_identity(copy, str(copy), copy / BASE_MODEL_FILE)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors has changed since its hash"):
        load_base_model(local, torch.device("cpu"))


def _documented(doc: str, start: str) -> str:
    """The one command in ``doc`` that starts with ``start`` (inside a code block)."""
    found = [
        line.strip()
        for line in (REPO / doc).read_text(encoding="utf-8").splitlines()
        if line.strip().startswith(start)
    ]
    assert len(found) == 1, f"{doc}: expected one '{start}...' command, found {found}"
    return found[0]


def test_documented_model_commands_run_as_written(model_cache, tmp_path):
    """docs/deploy.md's `fedllm model build` and `verify`, with the config and directory paths
    substituted: the shipped directory loads (as model.name) with the same hash."""
    config = tmp_path / "x.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL}), encoding="utf-8")
    shipped = tmp_path / "opt" / "base-model"
    substitutions = {"configs/x.yaml": str(config), "/opt/fedllm/base-model": str(shipped)}
    commands = [
        _documented("docs/deploy.md", "fedllm model build "),
        _documented("docs/deploy.md", "fedllm model verify "),
    ]
    assert _documented("docs/serving.md", "fedllm model verify ") == commands[1]
    runner = CliRunner()
    outputs = []
    for command in commands:
        for placeholder, path in substitutions.items():
            command = command.replace(placeholder, path)
        result = runner.invoke(cli_app, shlex.split(command)[1:])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    for output in outputs:
        assert f"base model sha256: {model_cache.sha256}" in output
    assert sorted(p.name for p in shipped.iterdir()) == sorted(
        [*model_cache.files, BASE_MODEL_FILE]
    )
    hospital = ModelConfig.model_validate({**MODEL, "name": str(shipped)})
    assert base_model(hospital).sha256 == model_cache.sha256

    # building again into the same directory is a no-op; into another model's is refused
    build = commands[0]
    for placeholder, path in substitutions.items():
        build = build.replace(placeholder, path)
    again = runner.invoke(cli_app, shlex.split(build)[1:])
    assert again.exit_code == 0, again.output
    (shipped / "tokenizer.json").write_text("{}", encoding="utf-8")
    broken = runner.invoke(cli_app, ["model", "verify", str(shipped)])
    assert broken.exit_code == 2
    assert "tokenizer.json has changed" in broken.output
    assert "Traceback" not in broken.output


# --- a hospital on another base model is refused before anything is charged --------------------


def _site_config(tmp_path: Path) -> ExperimentConfig:
    raw = _base(tmp_path)
    return validate_config({**raw, "model": MODEL})


def test_a_hospital_with_another_base_hash_is_refused_before_its_ledger_is_opened(
    tmp_path, model_cache
):
    config = _site_config(tmp_path)
    ledger = tmp_path / "hospital" / "ledger.db"
    with pytest.raises(BaseModelMismatchError, match=r"the server's base model is 000000000000"):
        HospitalSite(config, 0, f"sqlite:///{ledger}", base_model_sha256="0" * 64)
    assert not ledger.parent.exists()
    with pytest.raises(BaseModelMismatchError, match="the server sent no base-model hash"):
        HospitalSite(config, 0, f"sqlite:///{ledger}", base_model_sha256="")
    assert not ledger.parent.exists()


@pytest.mark.usefixtures("_server_identity")
def test_the_client_app_answers_a_foreign_base_hash_with_a_one_line_error(tmp_path, model_cache):
    experiment = experiment_json(_site_config(tmp_path))
    ledger = tmp_path / "own" / "ledger.db"
    ledger.parent.mkdir()
    node = {"hospital-name": "a", "ledger-url": f"sqlite:///{ledger}"}
    context = Context(1, 7, node, RecordDict(), {})

    def query(content: dict) -> Message:
        run = {"run-dir": str(tmp_path / "runs" / "r"), "run-id": "r", EXPERIMENT: experiment}
        return Message(
            RecordDict({"config": ConfigRecord({**run, **content})}),
            message_type=MessageType.QUERY,
            dst_node_id=7,
        )

    for content, reason in (
        ({HASH_KEY: "f" * 64}, "the server's base model is ffffffffffff"),
        ({}, "the server sent no base-model hash"),
    ):
        reply = status_handler(query(content), context)
        assert reply.has_error()
        assert reply.error.reason.startswith(f"hospital a: BaseModelMismatchError: {reason}")
        assert "\n" not in reply.error.reason
        assert not ledger.exists()
    reply = status_handler(query({HASH_KEY: model_cache.sha256}), context)
    assert not reply.has_error()
    assert reply.content["status"]["hospital"] == "a"
    # a cached site refuses a later message with another hash as well
    assert status_handler(query({HASH_KEY: "e" * 64}), context).has_error()


class ForeignModelGrid(ClientAppGrid):
    """Delivers the server's messages as a hospital with another base model would see them:
    the hash the server sent is recorded, and node 2's own model hashes differently."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hashes: list[str] = []

    def send_and_receive(self, messages, *, timeout=None):
        for message in messages:
            config = message.content["config"]
            self.hashes.append(str(config[HASH_KEY]))
            if message.metadata.dst_node_id == 2:
                config[HASH_KEY] = "d" * 64
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.usefixtures("_server_identity")
def test_the_server_sends_its_base_hash_and_a_foreign_hospital_stops_the_run(tmp_path, model_cache):
    config = _site_config(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    grid = ForeignModelGrid(
        {},
        {1: {"partition-id": 0, "num-partitions": 2}, 2: {"partition-id": 1, "num-partitions": 2}},
    )
    ledger = ServerLedger(f"sqlite:///{run_dir / 'server.db'}")
    ledger.start_run("r", config.model_dump_json())
    run_federation(
        grid, config, run_dir, RunReport(run_dir, config), ledger, completed=0, keyring=None
    )
    assert grid.sent == ["query", "query"]
    assert grid.hashes == [model_cache.sha256] * 2
    saved = read_report_json(run_dir)
    assert saved["status"] == "failed"
    assert len(saved["causes"]) == 1
    assert re.match(r"hospital b: BaseModelMismatchError: .*dddddddddddd", saved["causes"][0])
    assert (run_dir / "hospitals" / "a" / "ledger.db").exists()  # a's own model matched
    assert not (run_dir / "hospitals" / "b" / "ledger.db").exists()


# --- the inference server refuses an adapter trained on another base model ---------------------


def _health(backend: ModelBackend, adapter_dir: Path) -> dict:
    app = create_node_app(node_config(backend="model", adapter_dir=str(adapter_dir)), backend)
    with BackgroundServer(app) as server:
        return httpx.get(f"{server.url}/v1/health", timeout=10).json()


def _rebase(adapter_dir: Path, base: dict) -> None:
    """Rewrite the adapter's DP record as if its run had trained on base model ``base``."""
    record = parse_dp_record(read_artifact(adapter_dir / DP_RECORD_FILE, keyring=None))
    write_artifact(
        adapter_dir / DP_RECORD_FILE,
        record.model_copy(update={"base_model": base}).to_bytes(),
        keyring=None,
    )


def test_the_inference_server_refuses_an_adapter_of_another_base_model(tmp_path, model_cache):
    adapter_dir = tmp_path / "published"
    good = write_adapter(adapter_dir, seed=31)
    backend = ModelBackend(TINY, adapter_dir=adapter_dir, reload_interval_s=0, device="cpu")
    assert backend.base_model.sha256 == model_cache.sha256
    assert backend.model_version == good

    foreign = write_adapter(adapter_dir, seed=32)
    _rebase(adapter_dir, {"name": "tiny", "revision": None, "sha256": "c" * 64})
    with capture_logs() as logs:
        assert backend.check_for_update() is False
    refused = [e for e in logs if e["event"] == "adapter.refused"]
    assert len(refused) == 1
    assert refused[0]["kept"] == good
    assert backend.model_version == good
    health = _health(backend, adapter_dir)
    assert health["status"] == "ok"  # still serving the previous adapter of this base model
    assert health["adapter"]["version"] == good
    assert health["adapter_issue"] == (
        f"adapter {foreign} refused: it was trained on base model cccccccccccc ('tiny'), "
        f"this server loaded {model_cache.sha256[:12]}"
    )

    # A record from before base models were hashed cannot vouch for its base model either.
    _rebase(adapter_dir, {"name": "tiny", "tiny": MODEL["tiny"], "seed": 7})
    assert backend.check_for_update() is False
    assert "names no base-model hash" in backend.adapter_issue
    backend.close()


def test_a_server_whose_first_adapter_is_foreign_serves_the_base_model(tmp_path, model_cache):
    adapter_dir = tmp_path / "published"
    write_adapter(adapter_dir, seed=33)
    _rebase(adapter_dir, {"name": "elsewhere", "revision": None, "sha256": "b" * 64})
    backend = ModelBackend(
        TINY,
        adapter_dir=adapter_dir,
        reload_interval_s=0,
        device="cpu",
        allow_non_dp_adapters=True,  # lifts the DP rule, never the base-model rule
    )
    assert (backend.has_global_adapter, backend.model_version) == (False, "base")
    health = _health(backend, adapter_dir)
    assert health["status"] == "degraded"
    assert "trained on base model bbbbbbbbbbbb ('elsewhere')" in health["adapter_issue"]
    backend.close()
