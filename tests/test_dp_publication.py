"""Only DP-trained adapters are published and served.

The federation server publishes a run's final adapter (with its ``dp-record.json``) only when
the run trained with DP; an inference server refuses an adapter without a valid DP record,
keeps what it served before, and says why in ``/v1/health``, unless its operator explicitly
sets ``allow_non_dp_adapters``. Real components throughout: the ServerApp's publishing step,
RunReport, peft adapters on disk, ModelBackend and the node's HTTP app on real sockets.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
import structlog
import torch
from federation_helpers import TINY_TEST_MODEL, randomised_lora_model
from structlog.testing import capture_logs
from test_node_server import DP_PRIVACY, PROMPT, TINY, node_config, record_adapter, write_adapter

from fedllm.config.schema import ExperimentConfig
from fedllm.models.checkpoints import (
    PublicationRefusedError,
    publish_adapter,
    read_artifact,
    write_artifact,
)
from fedllm.models.dp_record import (
    DP_RECORD_FILE,
    DPRecordError,
    base_model_identity,
    parse_dp_record,
)
from fedllm.models.loading import base_model, load_lora_model
from fedllm.report.run_report import RunReport
from fedllm.security.encryption import KeyRing
from fedllm.serving.node.app import create_node_app
from fedllm.serving.node.config import validate_node_config
from fedllm.serving.node.generation import ModelBackend, read_adapter, read_dp_record
from fedllm.serving.node.server import BackgroundServer, build_backend
from fedllm.strategies.server_app import publish_final_adapter

MODEL = {**TINY_TEST_MODEL, "lora": {"r": 2, "alpha": 4.0}}
WEIGHTS = "adapter_model.safetensors"


def experiment(tmp_path: Path, *, dp: bool) -> ExperimentConfig:
    """The config of a run that asks to publish, with DP on or off."""
    return ExperimentConfig.model_validate(
        {
            "run": {"name": "pub", "output_dir": str(tmp_path), "publish_adapter_dir": "published"},
            "model": MODEL,
            "privacy": {"enabled": dp, "target_epsilon": 4.0, "delta": 1e-5},
        }
    )


def finished_report(run_dir: Path, config: ExperimentConfig) -> RunReport:
    """A run's report after training, with hospitals' privacy state as the strategy records it:
    one confirmed by its reply, one whose last round was lost (a projected, unconfirmed ε)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    report = RunReport(run_dir, config)
    report.update_hospital_privacy(
        "north",
        {
            "epsilon": 2.75,
            "epsilon-cap": 4.0,
            "noise-multiplier": 1.3,
            "sample-rate": 0.1,
            "steps": 6,
            "rounds-participated": 2,
        },
    )
    report.record_unconfirmed_round("south", {"epsilon-next": 3.5, "epsilon-cap": 4.0})
    expected = "replace-one" if config.privacy.enabled else None
    assert report.data["privacy"]["neighbouring"] == expected
    return report


@pytest.fixture(autouse=True)
def _default_log_levels():
    """Earlier tests may have configured structlog to drop info events these tests read."""
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def lora_model():
    return randomised_lora_model(TINY, seed=2)


def _health(backend: ModelBackend, adapter_dir: Path) -> dict:
    app = create_node_app(node_config(backend="model", adapter_dir=str(adapter_dir)), backend)
    with BackgroundServer(app) as server:
        return httpx.get(f"{server.url}/v1/health", timeout=10).json()


# --- publishing ------------------------------------------------------------------------------


def test_a_non_dp_run_never_publishes(tmp_path, lora_model):
    config = experiment(tmp_path, dp=False)
    run_dir = tmp_path / "pub"
    report = finished_report(run_dir, config)
    with capture_logs() as logs:
        published = publish_final_adapter(lora_model, config, run_dir, report, keyring=None)
    assert published is None
    assert not (tmp_path / "published").exists()
    refusals = [e for e in logs if e["event"] == "adapter.not_published"]
    assert len(refusals) == 1
    assert refusals[0]["log_level"] == "warning"
    assert "privacy is disabled" in refusals[0]["reason"]
    assert report.data["published_adapter"] is None

    # The publishing function itself refuses, whoever calls it, and writes nothing.
    with pytest.raises(PublicationRefusedError, match="privacy is disabled"):
        publish_adapter(
            lora_model,
            tmp_path / "direct",
            run_id="x",
            privacy=report.data["privacy"],
            model_config=config.model,
            keyring=None,
        )
    assert not (tmp_path / "direct").exists()
    assert not (tmp_path / "direct.staging").exists()


def test_the_no_dp_baseline_does_not_overwrite_the_published_dp_adapter(tmp_path, lora_model):
    dp_config = experiment(tmp_path, dp=True)
    published = publish_final_adapter(
        lora_model,
        dp_config,
        tmp_path / "pub",
        finished_report(tmp_path / "pub", dp_config),
        keyring=None,
    )
    assert published == tmp_path / "published"
    before = {p.name: p.read_bytes() for p in published.iterdir()}

    # fedllm run's federated_no_dp baseline: the same config with privacy switched off, its run
    # directory placed so that publish_adapter_dir resolves to the same (absolute) place.
    no_dp = dp_config.model_copy(
        update={
            "privacy": dp_config.privacy.model_copy(update={"enabled": False}),
            "run": dp_config.run.model_copy(update={"publish_adapter_dir": str(published)}),
        }
    )
    torch.manual_seed(9)
    other = load_lora_model(TINY, torch.device("cpu"), seed=9)
    sub_dir = tmp_path / "pub" / "baselines" / "federated_no_dp"
    report = finished_report(sub_dir, no_dp)
    assert publish_final_adapter(other, no_dp, sub_dir, report, keyring=None) is None
    assert {p.name: p.read_bytes() for p in published.iterdir()} == before


def test_a_dp_publish_writes_a_record_that_matches_the_report(tmp_path, lora_model):
    config = experiment(tmp_path, dp=True)
    run_dir = tmp_path / "pub"
    report = finished_report(run_dir, config)
    with capture_logs() as logs:
        published = publish_final_adapter(lora_model, config, run_dir, report, keyring=None)
    assert published == tmp_path / "published"
    assert any(e["event"] == "adapter.published" for e in logs)

    raw = json.loads((published / DP_RECORD_FILE).read_text())
    privacy = report.data["privacy"]
    assert raw["run_id"] == run_dir.name == "pub"
    assert raw["privacy_enabled"] is True
    assert raw["delta"] == privacy["delta"] == 1e-5
    assert raw["accountant"] == privacy["accountant"] == "pld"
    assert raw["unit"] == privacy["unit"] == config.privacy.unit
    assert raw["neighbouring"] == privacy["neighbouring"]
    assert raw["hospitals"] == {
        name: {key: state[key] for key in ("epsilon", "epsilon_cap", "epsilon_confirmed")}
        for name, state in privacy["hospitals"].items()
    }
    assert raw["hospitals"]["north"] == {
        "epsilon": 2.75,
        "epsilon_cap": 4.0,
        "epsilon_confirmed": True,
    }
    assert raw["hospitals"]["south"]["epsilon_confirmed"] is False
    # the base model by content hash, not by name or by the run's seed
    assert raw["base_model"] == base_model_identity(config.model)
    assert raw["base_model"]["name"] == "tiny"
    assert raw["base_model"]["sha256"] == base_model(config.model).sha256
    assert re.fullmatch(r"[0-9a-f]{64}", raw["base_model"]["sha256"])
    # bound to exactly the weights published next to it (which the node hashes as its version)
    digest = hashlib.sha256((published / WEIGHTS).read_bytes()).hexdigest()
    assert raw["adapter_sha256"] == digest
    files = read_adapter(published, keyring=None)
    assert files.version == digest[:12]
    assert read_dp_record(published, files, keyring=None).run_id == "pub"
    assert not (tmp_path / "published.staging").exists()


def test_a_published_adapter_and_its_record_are_encrypted_with_a_key_ring(tmp_path, lora_model):
    keyring = KeyRing.generate()
    config = experiment(tmp_path, dp=True)
    report = finished_report(tmp_path / "pub", config)
    published = publish_final_adapter(lora_model, config, tmp_path / "pub", report, keyring=keyring)
    assert published is not None
    assert b"run_id" not in (published / DP_RECORD_FILE).read_bytes()
    record = parse_dp_record(read_artifact(published / DP_RECORD_FILE, keyring=keyring))
    assert record.run_id == "pub"

    with capture_logs() as logs:
        backend = ModelBackend(
            TINY, adapter_dir=published, reload_interval_s=0, device="cpu", keyring=keyring
        )
    assert backend.served is not None
    assert backend.served.dp_record == record
    # run.seed (7) does not shape the base model: the node's own is the run's, by hash
    assert record.base_model["sha256"] == backend.base_model.sha256
    assert not [e for e in logs if e["event"] == "adapter.refused"]

    # A plaintext record planted next to encrypted weights is not accepted.
    (published / DP_RECORD_FILE).write_bytes(record.to_bytes())
    with pytest.raises(DPRecordError, match="plaintext"):
        read_dp_record(published, read_adapter(published, keyring=keyring), keyring=keyring)


def test_records_are_strict(tmp_path):
    good = json.loads(_published_record(tmp_path))
    parse_dp_record(json.dumps(good).encode())
    for broken in (
        {**good, "unit": "person"},
        {**good, "delta": "1e-5"},
        {**good, "extra": 1},
        {**good, "adapter_sha256": "abc"},
        {**{k: v for k, v in good.items() if k != "run_id"}},
        {**good, "hospitals": {"north": {"epsilon": 1.0, "epsilon_cap": None}}},
    ):
        with pytest.raises(DPRecordError, match="invalid DP record"):
            parse_dp_record(json.dumps(broken).encode())
    with pytest.raises(DPRecordError):
        parse_dp_record(b"not json")


def _published_record(tmp_path: Path) -> bytes:
    adapter = tmp_path / "adapter"
    write_adapter(adapter, seed=11)
    return (adapter / DP_RECORD_FILE).read_bytes()


# --- serving ---------------------------------------------------------------------------------


def test_node_refuses_an_adapter_without_a_record(tmp_path):
    adapter_dir = tmp_path / "published"
    version = write_adapter(adapter_dir, seed=21, dp=False)
    with capture_logs() as logs:
        backend = ModelBackend(TINY, adapter_dir=adapter_dir, reload_interval_s=0, device="cpu")
    refused = [e for e in logs if e["event"] == "adapter.refused"]
    assert len(refused) == 1
    assert DP_RECORD_FILE in refused[0]["reason"]
    assert (backend.has_global_adapter, backend.model_version) == (False, "base")
    health = _health(backend, adapter_dir)
    assert health["status"] == "degraded"
    assert health["adapter"] is None
    assert f"adapter {version} refused" in health["adapter_issue"]
    assert DP_RECORD_FILE in health["adapter_issue"]

    # Once its record arrives (a change the poller sees), the same weights are served.
    record_adapter(adapter_dir)
    assert backend.check_for_update() is True
    health = _health(backend, adapter_dir)
    assert (health["status"], health["model_version"]) == ("ok", version)
    assert health["adapter_issue"] is None


def test_node_refuses_a_record_saying_privacy_disabled_and_keeps_the_previous_adapter(tmp_path):
    adapter_dir = tmp_path / "published"
    good = write_adapter(adapter_dir, seed=22)
    backend = ModelBackend(TINY, adapter_dir=adapter_dir, reload_interval_s=0, device="cpu")
    assert backend.model_version == good
    good_text = backend.generate(PROMPT, 8, 0.0).text

    # New weights whose (well-formed) record says the run had no DP.
    candidate = tmp_path / "candidate"
    write_adapter(candidate, seed=23)
    record = parse_dp_record((candidate / DP_RECORD_FILE).read_bytes())
    disabled = record.model_copy(
        update={"privacy_enabled": False, "delta": None, "accountant": None}
    )
    parse_dp_record(disabled.to_bytes())  # valid as a record: refused for what it says
    for name in (WEIGHTS, "adapter_config.json"):
        shutil.copy(candidate / name, adapter_dir / name)
    write_artifact(adapter_dir / DP_RECORD_FILE, disabled.to_bytes(), keyring=None)
    with capture_logs() as logs:
        assert backend.check_for_update() is False
    refused = [e for e in logs if e["event"] == "adapter.refused"]
    assert len(refused) == 1
    assert "privacy was disabled" in refused[0]["reason"]
    assert refused[0]["kept"] == good
    assert backend.model_version == good
    assert backend.generate(PROMPT, 8, 0.0).text == good_text
    health = _health(backend, adapter_dir)
    assert health["status"] == "ok"  # still serving the previous, DP adapter
    assert health["adapter"]["version"] == good
    assert health["adapter"]["dp_record"]["run_id"] == "test-run"
    assert "privacy was disabled" in health["adapter_issue"]

    # A DP record left from an earlier adapter does not vouch for new weights either.
    write_artifact(adapter_dir / DP_RECORD_FILE, record.to_bytes(), keyring=None)
    stale = write_adapter(adapter_dir, seed=24, dp=False)
    assert backend.check_for_update() is False
    assert backend.model_version == good
    assert f"adapter {stale} refused" in backend.adapter_issue
    assert "describes other weights" in backend.adapter_issue


def test_node_serves_an_adapter_with_a_valid_record(tmp_path):
    adapter_dir = tmp_path / "published"
    version = write_adapter(adapter_dir, seed=25)
    backend = ModelBackend(TINY, adapter_dir=adapter_dir, reload_interval_s=0, device="cpu")
    assert backend.model_version == version
    health = _health(backend, adapter_dir)
    assert (health["status"], health["model_version"]) == ("ok", version)
    assert health["adapter_issue"] is None
    summary = health["adapter"]["dp_record"]
    assert summary == {
        "run_id": "test-run",
        "epsilon": {"north": 2.5, "south": 3.1},
        "max_epsilon": 3.1,
        "epsilon_confirmed": False,
        "delta": DP_PRIVACY["delta"],
        "accountant": "pld",
        "unit": "record",
        "neighbouring": "replace-one",
    }


def test_allow_non_dp_adapters_serves_an_unrecorded_adapter(tmp_path):
    adapter_dir = tmp_path / "published"
    version = write_adapter(adapter_dir, seed=26, dp=False)
    config = validate_node_config(
        {
            "node_id": "n",
            "hospital_id": "h",
            "model": TINY.model_dump(),
            "device": "cpu",
            "adapter_dir": str(adapter_dir),
            "allow_non_dp_adapters": True,
            "reload_interval_s": 60,
        }
    )
    with capture_logs() as logs:
        backend = build_backend(config, keyring=None)
    try:
        events = [e["event"] for e in logs]
        assert "node.non_dp_adapters_allowed" in events
        assert "adapter.refused" not in events
        assert backend.model_version == version
        health = _health(backend, adapter_dir)
        assert (health["status"], health["model_version"]) == ("ok", version)
        assert health["adapter"] == {"version": version, "dp_record": None}
        assert "without a valid DP record" in health["adapter_issue"]
    finally:
        backend.close()
    # The key defaults to off.
    assert validate_node_config({"node_id": "n", "hospital_id": "h"}).allow_non_dp_adapters is False
