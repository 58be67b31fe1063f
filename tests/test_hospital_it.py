"""What hospital IT runs and sees: ``fedllm hospital check`` and ``status``, private state files,
and a one-line reason when an experiment's δ is not the one the hospital's ledger uses.

Real components: credentials from the project's own CA code, a real TLS listener on loopback
for ``check --online``, real SQLite ledgers, the real ClientApp handler and federation loop.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import threading
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from test_node_server import TINY, node_config, write_adapter
from test_preflight import ClientAppGrid, _base, _server_identity  # noqa: F401 (fixture)
from typer.testing import CliRunner

from fedllm.cli.app import app
from fedllm.cli.hospital import prepare_private_state
from fedllm.config import validate_config
from fedllm.federation.hospital import LedgerDeltaError, open_ledger
from fedllm.federation.hospital_config import load_hospital_config
from fedllm.federation.run_identity import RUN_ID_FILE, ledger_run_id
from fedllm.models.checkpoints import read_artifact, write_artifact
from fedllm.models.dp_record import DP_RECORD_FILE, parse_dp_record
from fedllm.models.loading import base_model
from fedllm.privacy.events import GaussianRelease
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.run_report import RunReport, read_report_json
from fedllm.security.certs import init_credentials
from fedllm.security.encryption import KeyRing
from fedllm.security.environment import ENV_VAR, FILE_ENV_VAR
from fedllm.strategies.server_app import run_federation

runner = CliRunner()
DELTA = 1e-5


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    """A consortium CA with a SuperLink certificate for loopback and hospital north's key."""
    return init_credentials(tmp_path_factory.mktemp("creds"), hospitals=["north"])


@pytest.fixture(scope="module")
def superlink(creds):
    """A TLS listener on loopback holding the SuperLink's certificate: the handshake target."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(creds.superlink_cert, creds.superlink_key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with closing(connection):
                try:
                    with context.wrap_socket(connection, server_side=True) as tls:
                        tls.recv(1)
                except (ssl.SSLError, OSError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    listener.close()


def _hospital(folder: Path, creds, address: str = "127.0.0.1:9", **changes) -> Path:
    """A hospital.yaml for north with real credentials, its records and a private key 0600."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.csv").write_text(
        "body,ward,pid\n"
        + "".join(f"note {i} about the heart,cardiology,p{i % 7}\n" for i in range(40))
    )
    private_key, public_key = creds.supernode_keys["north"]
    raw = {
        "hospital": "north",
        "superlink": {"address": address, "ca_cert": str(creds.ca_cert)},
        "auth": {"private_key": str(private_key), "public_key": str(public_key)},
        "data": {"path": "notes.csv", "text_field": "body", "patient_field": "pid"},
        "privacy": {"ledger_url": "sqlite:///state/ledger.db", "epsilon_cap": 3.5},
        "runtime": {"state_dir": "state"},
    }
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = folder / "hospital.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _files(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


# --- fedllm hospital check ---------------------------------------------------------------------


def test_check_validates_and_writes_nothing(tmp_path, creds):
    config = _hospital(tmp_path / "site", creds)
    before = _files(tmp_path)
    result = runner.invoke(app, ["hospital", "check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "hospital north, 40 records in" in result.output
    assert _files(tmp_path) == before  # no state/node-config.toml, no ledger
    result = runner.invoke(app, ["hospital", "check", "--config", str(config), "--json"])
    summary = json.loads(result.output)
    assert summary["records"] == 40
    assert summary["superlink"] is None
    assert _files(tmp_path) == before


def test_check_names_a_text_field_the_file_does_not_have(tmp_path, creds):
    config = _hospital(tmp_path / "site", creds, data={"text_field": "text"})
    result = runner.invoke(app, ["hospital", "check", "--config", str(config)])
    assert result.exit_code == 2
    assert "missing column 'text'; available columns are ['body', 'ward', 'pid']" in (result.output)
    assert "Traceback" not in result.output


def test_check_refuses_an_auth_key_other_accounts_can_read(tmp_path, creds):
    config = _hospital(tmp_path / "site", creds)
    private_key = creds.supernode_keys["north"][0]
    assert stat.S_IMODE(private_key.stat().st_mode) == 0o600  # as certs init writes it
    private_key.chmod(0o644)
    try:
        result = runner.invoke(app, ["hospital", "check", "--config", str(config)])
    finally:
        private_key.chmod(0o600)
    assert result.exit_code == 2
    assert f"auth.private_key: {private_key} has mode 0644" in result.output
    assert f"chmod 600 {private_key}" in result.output


def test_check_online_reaches_the_superlink_over_verified_tls(tmp_path, creds, superlink):
    config = _hospital(tmp_path / "site", creds, address=superlink)
    before = _files(tmp_path)
    result = runner.invoke(app, ["hospital", "check", "--config", str(config), "--online"])
    assert result.exit_code == 0, result.output
    assert "ok SuperLink: TLSv1.3 to" in result.output
    assert "'fedllm-superlink' verified against" in result.output
    assert _files(tmp_path) == before


def test_check_online_fails_in_one_line_on_another_ca_or_no_listener(
    tmp_path, creds, superlink, tmp_path_factory
):
    other = init_credentials(tmp_path_factory.mktemp("other-ca"), hospitals=["north"])
    config = _hospital(
        tmp_path / "site", creds, address=superlink, superlink={"ca_cert": str(other.ca_cert)}
    )
    result = runner.invoke(app, ["hospital", "check", "--config", str(config), "--online"])
    assert result.exit_code == 2
    assert f"superlink.address: TLS to {superlink} failed: CERTIFICATE_VERIFY_FAILED" in (
        result.output
    )
    with closing(socket.create_server(("127.0.0.1", 0))) as unused:
        port = unused.getsockname()[1]
    config = _hospital(tmp_path / "site2", creds, address=f"127.0.0.1:{port}")
    result = runner.invoke(app, ["hospital", "check", "--config", str(config), "--online"])
    assert result.exit_code == 2
    assert f"superlink.address: cannot reach 127.0.0.1:{port}: Connection refused" in (
        result.output
    )


# --- fedllm hospital status --------------------------------------------------------------------


def test_status_shows_budget_history_base_model_and_served_adapter(tmp_path, creds):
    adapter_dir = tmp_path / "site" / "adapter"
    adapter_dir.mkdir(parents=True)
    version = write_adapter(adapter_dir, seed=5)
    inference = node_config(
        hospital_id="north", backend="model", adapter_dir=str(adapter_dir)
    ).model_dump(mode="json")
    config = _hospital(tmp_path / "site", creds)
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "inference": inference}))
    ledger_file = tmp_path / "site" / "state" / "ledger.db"

    empty = runner.invoke(app, ["hospital", "status", "--config", str(config), "--json"])
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.output)["privacy"]["spent_epsilon"] == 0.0
    assert not ledger_file.exists()  # reading never creates the ledger

    ledger_file.parent.mkdir()
    ledger = NodePrivacyLedger(f"sqlite:///{ledger_file}", "north", epsilon_cap=3.5, delta=DELTA)
    ledger.charge([GaussianRelease(noise_multiplier=4.0)], round_id=1, run_id="x-1a2b")
    ledger.charge([GaussianRelease(noise_multiplier=6.0)], round_id=2, run_id="x-1a2b")
    spent = ledger.spent_epsilon()

    result = runner.invoke(app, ["hospital", "status", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    privacy = status["privacy"]
    assert privacy["delta"] == DELTA
    assert privacy["spent_epsilon"] == pytest.approx(spent)
    assert privacy["remaining_epsilon"] == pytest.approx(3.5 - spent)
    assert [(e["run_id"], e["round_id"]) for e in privacy["events"]] == [
        ("x-1a2b", 1),
        ("x-1a2b", 2),
    ]
    assert status["base_model"]["sha256"] == base_model(TINY).sha256
    adapter = status["adapter"]
    assert adapter["version"] == version
    assert adapter["run_id"] == "test-run"
    assert adapter["refusal"] is None

    text = runner.invoke(app, ["hospital", "status", "--config", str(config)])
    assert text.exit_code == 0, text.output
    assert f"ε spent {spent:.4g} of cap 3.5, remaining {3.5 - spent:.4g}" in text.output
    assert f"version {version} from run test-run" in text.output
    assert base_model(TINY).sha256 in text.output

    # an adapter of another base model is shown as one the server would not serve
    record = parse_dp_record(read_artifact(adapter_dir / DP_RECORD_FILE, keyring=None))
    foreign = record.model_copy(update={"base_model": {**record.base_model, "sha256": "c" * 64}})
    write_artifact(adapter_dir / DP_RECORD_FILE, foreign.to_bytes(), keyring=None)
    result = runner.invoke(app, ["hospital", "status", "--config", str(config), "--json"])
    assert "trained on base model cccccccccccc" in json.loads(result.output)["adapter"]["refusal"]


def test_status_reads_an_encrypted_ledger_with_the_key_ring_of_its_environment(
    tmp_path, creds, monkeypatch
):
    """`fedllm hospital status` is an entry point: it reads FEDLLM_ENCRYPTION_KEYS and hands
    the key ring to the ledger, as the hospital's ClientApp and inference server do."""
    config = _hospital(tmp_path / "site", creds)
    ledger_file = tmp_path / "site" / "state" / "ledger.db"
    ledger_file.parent.mkdir(parents=True)
    keyring = KeyRing.generate()
    ledger = NodePrivacyLedger(
        f"sqlite:///{ledger_file}", "north", epsilon_cap=3.5, delta=DELTA, keyring=keyring
    )
    ledger.charge([GaussianRelease(noise_multiplier=4.0)], round_id=1, run_id="x-1a2b")

    monkeypatch.delenv(FILE_ENV_VAR, raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    keyless = runner.invoke(app, ["hospital", "status", "--config", str(config), "--json"])
    assert keyless.exit_code != 0
    assert "column privacy_events.event is encrypted but no key ring is set" in keyless.output
    assert "Traceback" not in keyless.output

    monkeypatch.setenv(ENV_VAR, keyring.to_json())
    result = runner.invoke(app, ["hospital", "status", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    privacy = json.loads(result.output)["privacy"]
    assert privacy["spent_epsilon"] == pytest.approx(ledger.spent_epsilon())
    assert [e["round_id"] for e in privacy["events"]] == [1]


# --- private state files -----------------------------------------------------------------------


def test_state_dir_logs_and_ledger_are_private(tmp_path, creds):
    hospital = load_hospital_config(_hospital(tmp_path / "site", creds))
    previous = os.umask(0o022)
    try:
        state = prepare_private_state(hospital)
        log = state / "supernode.log"
        log.write_text("started\n")  # as any process started after this would create it
        ledger = open_ledger(hospital.privacy.ledger_url, "north", epsilon_cap=3.5, delta=DELTA)
        ledger.charge([GaussianRelease(noise_multiplier=4.0)], round_id=1, run_id="r-1")
    finally:
        os.umask(previous)
    ledger_file = Path(hospital.privacy.ledger_url.removeprefix("sqlite:///"))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    for file in ledger_file.parent.glob("ledger.db*"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_a_ledger_opened_by_a_client_app_is_private_even_with_a_loose_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        ledger = open_ledger(
            f"sqlite:///{tmp_path / 'h' / 'ledger.db'}", "a", epsilon_cap=1.0, delta=DELTA
        )
        ledger.charge([GaussianRelease(noise_multiplier=9.0)], round_id=1, run_id="r-1")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "h").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "h" / "ledger.db").stat().st_mode) == 0o600


# --- another δ: one line, in the reply and the researcher's report -----------------------------


@pytest.mark.usefixtures("_server_identity")
def test_an_experiment_with_another_delta_is_refused_in_one_line(tmp_path):
    config = validate_config({**_base(tmp_path), "model": TINY.model_dump(mode="json")})
    own = tmp_path / "a" / "ledger.db"
    own.parent.mkdir()
    NodePrivacyLedger(f"sqlite:///{own}", "a", epsilon_cap=8.0, delta=1e-6)
    with pytest.raises(LedgerDeltaError):
        open_ledger(f"sqlite:///{own}", "a", epsilon_cap=8.0, delta=DELTA)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    grid = ClientAppGrid(
        {},
        {
            1: {"hospital-name": "a", "ledger-url": f"sqlite:///{own}"},
            2: {"partition-id": 1, "num-partitions": 2},
        },
    )
    ledger = ServerLedger(f"sqlite:///{run_dir / 'server.db'}")
    ledger.start_run("r", config.model_dump_json())
    run_federation(
        grid, config, run_dir, RunReport(run_dir, config), ledger, completed=0, keyring=None
    )
    saved = read_report_json(run_dir)
    assert saved["status"] == "failed"
    assert saved["causes"] == [
        "hospital a: LedgerDeltaError: this hospital's ledger accounts at delta=1e-06, the "
        "experiment asks delta=1e-05: ε at different δ cannot be added; run with "
        "privacy.delta: 1e-06"
    ]


# --- a run id unique across researchers ---------------------------------------------------------


def test_the_ledger_run_id_is_the_run_name_plus_a_suffix_kept_across_restarts(tmp_path):
    first, second = tmp_path / "alice" / "quickstart", tmp_path / "bob" / "quickstart"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    alice, bob = ledger_run_id(first), ledger_run_id(second)
    assert alice.startswith("quickstart-")
    assert bob.startswith("quickstart-")
    assert len(alice) == len("quickstart-") + 12
    assert alice != bob
    assert ledger_run_id(first) == alice  # a resumed run is the same run
    assert stat.S_IMODE((first / RUN_ID_FILE).stat().st_mode) == 0o600
