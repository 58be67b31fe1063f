"""Deployment without processes: hospital.yaml validation, the exact Flower command lines
(secure unless insecure is asked for), the node config a hospital's ClientApp reads back, and
the researcher's federation entry."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from fedllm.config import ConfigError, validate_config
from fedllm.federation.deployment import (
    DeploymentError,
    SuperLinkTls,
    hospital_node_config,
    hospital_supernode_command,
    missing_hospital_files,
    superlink_command,
    supernode_command,
    write_node_config,
)
from fedllm.federation.experiment import APP_ROOT
from fedllm.federation.flower_cli import deployed_federation, write_flower_connection
from fedllm.federation.hospital_config import load_hospital_config
from fedllm.federation.hospital_data import hospital_data
from fedllm.federation.node_settings import NodeConfigError, node_settings


def _hospital_file(folder: Path, **changes) -> Path:
    (folder / "creds").mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "auth_key", "auth_key.pub"):
        (folder / "creds" / name).write_text("x")
    (folder / "notes.csv").write_text(
        "body,ward,pid\n"
        + "".join(f"note {i} about the heart,cardiology,p{i % 40}\n" for i in range(80))
    )
    raw = {
        "hospital": "north",
        "superlink": {"address": "link.example:9092", "ca_cert": "creds/ca.crt"},
        "auth": {"private_key": "creds/auth_key", "public_key": "creds/auth_key.pub"},
        "data": {
            "path": "notes.csv",
            "text_field": "body",
            "specialty_field": "ward",
            "patient_field": "pid",
        },
        "privacy": {"ledger_url": "sqlite:///state/ledger.db", "epsilon_cap": 3.5},
        "runtime": {"state_dir": "state", "clientapp_port": 9200},
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        section = raw
        for part in parents:
            section = section.setdefault(part, {})
        if value is None:
            section.pop(leaf, None)
        else:
            section[leaf] = value
    path = folder / "hospital.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_relative_paths_resolve_against_the_yaml_not_the_working_directory(tmp_path, monkeypatch):
    path = _hospital_file(tmp_path / "site")
    monkeypatch.chdir(tmp_path)
    config = load_hospital_config(Path("site/hospital.yaml"))
    site = (tmp_path / "site").resolve()
    assert config.superlink.ca_cert == site / "creds" / "ca.crt"
    assert config.data.path == site / "notes.csv"
    assert config.privacy.ledger_url == f"sqlite:///{site / 'state' / 'ledger.db'}"
    assert config.runtime.state_dir == site / "state"
    assert path.is_file()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"superlink__ca_cert": None}, "superlink.ca_cert is required"),
        ({"superlink__insecure": True}, "cannot be combined"),
        ({"auth": None}, "auth.private_key is required"),
        ({"privacy__epsilon_cap": 0}, "privacy.epsilon_cap: got 0"),
        ({"superlink__address": "no-port"}, "superlink.address"),
        ({"data__colour": "x"}, "data.colour: unknown key"),
        ({"hospital": "bad name"}, "hospital: got 'bad name'"),
    ],
)
def test_hospital_yaml_mistakes_are_named(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_hospital_config(_hospital_file(tmp_path, **changes))


def test_inference_section_must_share_the_hospital_and_its_ledger(tmp_path):
    inference = {
        "node_id": "n1",
        "hospital_id": "north",
        "backend": "constant",
        "ledger": {"url": "sqlite:///other.db", "epsilon_cap": 3.5},
        "consensus": {"insecure_loopback": True},
    }
    with pytest.raises(ConfigError, match="one budget"):
        load_hospital_config(_hospital_file(tmp_path, inference=inference))
    inference["ledger"]["url"] = "sqlite:///state/ledger.db"
    config = load_hospital_config(_hospital_file(tmp_path, inference=inference))
    assert config.inference.ledger.url == config.privacy.ledger_url
    with pytest.raises(ConfigError, match="must be the hospital"):
        load_hospital_config(_hospital_file(tmp_path, inference={**inference, "hospital_id": "x"}))


def test_superlink_command_is_tls_with_supernode_auth_by_default(tmp_path):
    tls = SuperLinkTls(tmp_path / "ca.crt", tmp_path / "s.crt", tmp_path / "s.key")
    command = superlink_command(host="0.0.0.0", port=9092, database=tmp_path / "db", tls=tls)
    assert command[0] == "flower-superlink"
    assert "--enable-supernode-auth" in command
    assert command[command.index("--ssl-ca-certfile") + 1] == str(tls.ca_cert)
    assert command[command.index("--ssl-certfile") + 1] == str(tls.cert)
    assert command[command.index("--ssl-keyfile") + 1] == str(tls.key)
    assert "--insecure" not in command
    assert "--disable-runtime-dependency-installation" in command
    with pytest.raises(DeploymentError, match="insecure mode must be asked for explicitly"):
        superlink_command(host="0.0.0.0", port=9092, database=tmp_path / "db", tls=None)
    insecure = superlink_command(
        host="127.0.0.1", port=9092, database=tmp_path / "db", tls=None, insecure=True
    )
    assert "--insecure" in insecure
    assert "--enable-supernode-auth" not in insecure


def test_supernode_command_needs_a_key_with_tls_and_none_without(tmp_path):
    common = {"superlink": "h:1", "node_config_file": tmp_path / "n.toml", "clientapp_port": 9}
    with pytest.raises(DeploymentError, match="private key is required"):
        supernode_command(root_certificates=tmp_path / "ca", auth_private_key=None, **common)
    with pytest.raises(DeploymentError, match="needs TLS"):
        supernode_command(
            root_certificates=None, auth_private_key=tmp_path / "k", insecure=True, **common
        )
    with pytest.raises(DeploymentError, match="explicitly"):
        supernode_command(root_certificates=None, auth_private_key=None, **common)


def test_hospital_command_and_node_config_round_trip_to_the_client(tmp_path):
    hospital = load_hospital_config(_hospital_file(tmp_path))
    command = hospital_supernode_command(hospital)
    assert command[command.index("--root-certificates") + 1] == str(hospital.superlink.ca_cert)
    assert command[command.index("--auth-supernode-private-key") + 1] == str(
        hospital.auth.private_key
    )
    assert command[command.index("--port") + 1] == "9200"
    node_file = Path(command[command.index("--node-config") + 1])
    # what flower-supernode hands the ClientApp is the TOML file, read back unchanged
    node = tomllib.loads(node_file.read_text())
    assert node == hospital_node_config(hospital)

    experiment = validate_config(
        {
            "federation": {
                "num_hospitals": 2,
                "cohort_size": 2,
                "hospitals": [{"name": "south"}, {"name": "north"}],
            },
            "data": {"eval_fraction": 0.25},
        }
    )
    settings = node_settings(experiment, node, run_dir=str(tmp_path / "run"))
    assert settings.index == 1
    assert settings.ledger_url == hospital.privacy.ledger_url
    assert settings.epsilon_cap == 3.5
    data = hospital_data(experiment, settings.index, settings.local_data, settings.split_key)
    key_file = Path(hospital.privacy.ledger_url.removeprefix("sqlite:///")).parent / "split.key"
    assert key_file.stat().st_mode & 0o777 == 0o600  # the hospital's secret, made on first use
    assert node_settings(experiment, node, run_dir=str(tmp_path / "run")).split_key == (
        settings.split_key
    )
    assert settings.evaluation_allowed
    texts = {r.text for r in data.train + data.eval}
    assert texts == {f"note {i} about the heart" for i in range(80)}
    assert {r.specialty for r in data.train} == {"cardiology"}
    train_patients = {r.patient_id for r in data.train}
    assert train_patients.isdisjoint({r.patient_id for r in data.eval})
    assert not (tmp_path / "run").exists()  # a deployed hospital keeps nothing in run dirs


def test_node_config_naming_a_hospital_outside_the_experiment_is_refused(tmp_path):
    experiment = validate_config({"federation": {"num_hospitals": 2, "cohort_size": 2}})
    with pytest.raises(NodeConfigError, match="ask the researcher"):
        node_settings(experiment, {"hospital-name": "north"}, str(tmp_path))
    simulated = node_settings(experiment, {"partition-id": 1}, str(tmp_path))
    assert simulated.index == 1
    assert simulated.local_data is None
    assert (
        simulated.ledger_url == f"sqlite:///{tmp_path / 'hospitals' / 'hospital-1' / 'ledger.db'}"
    )


def test_node_config_values_survive_awkward_characters(tmp_path):
    values = {"data-path": 'C:\\data\\my "notes".jsonl', "ledger-url": "sqlite:///a b.db", "x": 2.5}
    path = write_node_config(tmp_path / "n.toml", values)
    assert tomllib.loads(path.read_text()) == values


def test_researcher_federation_entry(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    home = tmp_path / "flwr"
    write_flower_connection(home, "consortium", "link.example:9092", ca)
    target = deployed_federation("consortium", flower_config=home / "config.toml")
    assert target.address == "link.example:9092"
    assert target.root_certificates == ca
    with pytest.raises(
        DeploymentError, match=r"no \[superlink.other\] entry; known: \['consortium'\]"
    ):
        deployed_federation("other", flower_config=home / "config.toml")


def test_shipped_hospital_template_is_valid_and_names_what_to_fill_in():
    template = APP_ROOT / "configs" / "hospital.yaml"
    config = load_hospital_config(template)
    assert not config.superlink.insecure
    assert config.auth is not None
    assert config.inference is None
    missing = missing_hospital_files(config)
    assert any(line.startswith("superlink.ca_cert:") for line in missing)
    assert any(line.startswith("data.path:") for line in missing)


def test_flower_connection_records_an_absolute_ca_path(tmp_path, monkeypatch):
    """`clients/start_superlink.sh credentials` passes a relative directory; Flower needs an
    absolute root-certificates path (it refused: 'expected absolute path')."""
    (tmp_path / "credentials" / "ca").mkdir(parents=True)
    (tmp_path / "credentials" / "ca" / "ca.crt").write_text("x")
    monkeypatch.chdir(tmp_path)
    config = write_flower_connection(
        tmp_path / "flwr", "op", "127.0.0.1:9092", Path("credentials/ca/ca.crt")
    )
    written = tomllib.loads(config.read_text())["superlink"]["op"]["root-certificates"]
    assert written == str(tmp_path / "credentials" / "ca" / "ca.crt")


def test_the_submitted_bundle_beats_a_same_named_config_in_the_working_directory(
    tmp_path, monkeypatch
):
    """A `configs/x.yaml` next to a hospital's SuperNode must not replace the researcher's."""
    from fedllm.federation.experiment import experiment_from_run_config

    bundle, workdir = tmp_path / "bundle", tmp_path / "hospital"
    for root, steps in ((bundle, 3), (workdir, 99)):
        (root / "configs").mkdir(parents=True)
        (root / "configs" / "x.yaml").write_text(f"training:\n  local_steps: {steps}\n")
    (workdir / "configs" / "only-here.yaml").write_text("training:\n  local_steps: 7\n")
    monkeypatch.chdir(workdir)
    chosen = experiment_from_run_config({"config-file": "configs/x.yaml"}, bundle)
    assert chosen.training.local_steps == 3
    # a file only the working directory has is still found (fedllm's own CLI paths)
    fallback = experiment_from_run_config({"config-file": "configs/only-here.yaml"}, bundle)
    assert fallback.training.local_steps == 7
