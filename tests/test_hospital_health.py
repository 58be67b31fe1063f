"""Hospital IT's own view of its processes, with real ones: `fedllm hospital start` runs a real
SuperNode and a real inference server (`fedllm serve`, constant backend, mutual TLS on its API
port, a plain probe port); its banner names the inference server only once the probe answers,
and `fedllm hospital health` reports each part from this machine, with no certificate."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedllm.federation.launcher import free_port, stop_process_tree
from fedllm.security.certs import init_credentials

pytestmark = pytest.mark.integration


def _hospital(folder: Path, creds) -> Path:
    folder.mkdir(parents=True)
    (folder / "notes.csv").write_text(
        "body,pid\n" + "".join(f"note {i} about the heart,p{i % 7}\n" for i in range(20))
    )
    private_key, public_key = creds.supernode_keys["north"]
    cert, key = creds.node_server_certs["north"]
    raw = {
        "hospital": "north",
        # nothing listens there: the SuperNode keeps retrying, alive, never activated
        "superlink": {"address": f"127.0.0.1:{free_port()}", "ca_cert": str(creds.ca_cert)},
        "auth": {"private_key": str(private_key), "public_key": str(public_key)},
        "data": {"path": "notes.csv", "text_field": "body", "patient_field": "pid"},
        "privacy": {"ledger_url": "sqlite:///state/ledger.db", "epsilon_cap": 3.5},
        "runtime": {"state_dir": "state", "clientapp_port": free_port(), "warm_worker": False},
        "inference": {
            "node_id": "north-1",
            "hospital_id": "north",
            "backend": "constant",
            "host": "127.0.0.1",
            "port": free_port(),
            "probe_port": free_port(),
            "tls": {
                "cert_file": str(cert),
                "key_file": str(key),
                "client_ca_file": str(creds.ca_cert),
            },
        },
    }
    path = folder / "hospital.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fedllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    return _hospital(root / "north", init_credentials(root / "credentials", hospitals=["north"]))


def test_health_reports_every_part_down_when_nothing_runs(config):
    result = _fedllm("hospital", "health", "--config", str(config), "--json")
    assert result.returncode == 1, result.stderr
    parts = {part["name"]: part for part in json.loads(result.stdout)}
    assert set(parts) == {"SuperNode", "inference server"}
    assert parts["SuperNode"]["state"] == "not running"
    assert parts["inference server"]["state"] == "not answering"


def test_start_announces_the_inference_server_once_it_answers_and_health_sees_it(config):
    out = config.parent / "start.out"
    with out.open("wb") as log:
        start = subprocess.Popen(
            [sys.executable, "-m", "fedllm.cli", "hospital", "start", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    inference = yaml.safe_load(config.read_text())["inference"]
    try:
        deadline = time.monotonic() + 90
        while "inference server on" not in out.read_text():
            assert start.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.3)
        banner = out.read_text()
        assert f"inference server on 127.0.0.1:{inference['port']}: ready" in banner
        # the first line, printed at once, names no inference server
        assert "inference server" not in banner.split("Ctrl-C stops.")[0]
        result = _fedllm("hospital", "health", "--config", str(config), "--json")
        parts = {part["name"]: part for part in json.loads(result.stdout)}
        assert parts["inference server"]["state"] == "ready"
        assert parts["inference server"]["ok"] is True
        # alive but never activated (no SuperLink answers): running, not ok, so exit code 1
        assert parts["SuperNode"]["state"] == "running"
        assert "not activated yet" in parts["SuperNode"]["detail"]
        assert result.returncode == 1
        table = _fedllm("hospital", "health", "--config", str(config)).stdout
        assert "inference server" in table
        assert "ready" in table
    finally:
        stop_process_tree(start)
