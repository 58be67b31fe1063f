"""Encryption at rest: tampering, swapping and wrong keys are refused; rotation keeps data."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from sqlalchemy import Integer, Text, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from structlog.testing import capture_logs
from typer.testing import CliRunner

from fedllm.cli.keys import keys_app
from fedllm.security.encryption import (
    MAGIC,
    EncryptedJSON,
    EncryptionError,
    IntegrityError,
    KeyFile,
    KeyRing,
    current_keyring,
    decrypt_bytes,
    decrypt_file,
    encrypt_bytes,
    encrypt_file,
    generate_key_file,
    key_id_of,
    rotate_files,
    write_encrypted,
)
from fedllm.security.environment import (
    ENV_VAR,
    FILE_ENV_VAR,
    keyring_from_environment,
    keyring_from_variable,
)

SECRET = b"patient 4711: metformin 500mg"


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.generate("k1")


def test_bytes_round_trip_and_fresh_nonces(ring: KeyRing) -> None:
    first = encrypt_bytes(SECRET, ring, associated_data=b"a")
    second = encrypt_bytes(SECRET, ring, associated_data=b"a")
    assert first != second  # random nonce: equal plaintexts do not give equal files
    assert first.startswith(MAGIC)
    assert SECRET not in first
    assert key_id_of(first) == "k1"
    assert decrypt_bytes(first, ring, associated_data=b"a") == SECRET


def test_flipping_any_single_byte_is_detected(ring: KeyRing) -> None:
    blob = encrypt_bytes(SECRET, ring, associated_data=b"name")
    for position in range(len(blob)):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(IntegrityError):
            decrypt_bytes(bytes(tampered), ring, associated_data=b"name")
    for length in (0, len(MAGIC), len(blob) - 1):
        with pytest.raises(IntegrityError):
            decrypt_bytes(blob[:length], ring, associated_data=b"name")


def test_wrong_key_or_unknown_key_id_is_refused(ring: KeyRing) -> None:
    blob = encrypt_bytes(SECRET, ring, associated_data=b"n")
    with pytest.raises(IntegrityError, match="authentication failed"):
        decrypt_bytes(blob, KeyRing.generate("k1"), associated_data=b"n")
    with pytest.raises(IntegrityError, match="not in the key ring"):
        decrypt_bytes(blob, KeyRing.generate("other"), associated_data=b"n")
    with pytest.raises(IntegrityError):
        decrypt_bytes(blob, ring, associated_data=b"m")


def test_file_round_trip_is_atomic_and_private(tmp_path: Path, ring: KeyRing) -> None:
    plain = tmp_path / "adapter.bin"
    plain.write_bytes(SECRET)
    encrypt_file(plain, ring)
    assert SECRET not in plain.read_bytes()
    assert stat.S_IMODE(plain.stat().st_mode) == 0o600
    assert decrypt_file(plain, ring) == SECRET
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.bin"]  # no temporary left over
    with pytest.raises(EncryptionError, match="already encrypted"):
        encrypt_file(plain, ring)
    # a copy into NAME.enc decrypts with the same default logical name
    other = tmp_path / "notes.txt"
    other.write_bytes(SECRET)
    target = encrypt_file(other, ring, output=tmp_path / "notes.txt.enc")
    assert decrypt_file(target, ring) == SECRET


def test_swapping_two_encrypted_files_is_detected(tmp_path: Path, ring: KeyRing) -> None:
    a, b = tmp_path / "round-0001.pt", tmp_path / "round-0002.pt"
    write_encrypted(a, b"first", ring)
    write_encrypted(b, b"second", ring)
    blob_a, blob_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(blob_b)
    b.write_bytes(blob_a)
    for path in (a, b):
        with pytest.raises(IntegrityError, match="authentication failed"):
            decrypt_file(path, ring)
    # the original name still opens the moved file: the binding is to the logical name
    assert decrypt_file(a, ring, name="round-0002.pt") == b"second"


def test_rotation_moves_files_to_the_new_key_and_keeps_them_readable(
    tmp_path: Path, ring: KeyRing
) -> None:
    nested = tmp_path / "run" / "checkpoints"
    nested.mkdir(parents=True)
    files = {nested / "round-0001.pt": b"one", tmp_path / "run" / "adapter.bin": b"two"}
    for path, data in files.items():
        write_encrypted(path, data, ring)
    plain = tmp_path / "run" / "config.yaml"
    plain.write_bytes(b"plain: true\n")
    outside = tmp_path / "elsewhere.bin"
    write_encrypted(outside, b"left behind", ring)

    rotated_ring = ring.with_new_key("k2")
    result = rotate_files(tmp_path / "run", rotated_ring)
    assert sorted(result.rotated) == sorted(files)
    assert result.skipped == [plain]
    assert not result.failed
    assert plain.read_bytes() == b"plain: true\n"
    for path, data in files.items():
        assert key_id_of(path.read_bytes()) == "k2"
        assert decrypt_file(path, rotated_ring) == data
        assert decrypt_file(path, rotated_ring.only_current()) == data
        with pytest.raises(IntegrityError):
            decrypt_file(path, ring)  # the old key alone no longer opens rotated files

    again = rotate_files([tmp_path / "run"], rotated_ring)
    assert not again.rotated
    assert sorted(again.unchanged) == sorted(files)
    # dropping the old key makes a file that was not rotated unreadable
    assert decrypt_file(outside, rotated_ring) == b"left behind"
    with pytest.raises(IntegrityError, match="not in the key ring"):
        decrypt_file(outside, rotated_ring.only_current())


def test_rotation_reports_a_tampered_file_and_leaves_it(tmp_path: Path, ring: KeyRing) -> None:
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    write_encrypted(good, b"good", ring)
    write_encrypted(bad, b"bad", ring)
    tampered = bytearray(bad.read_bytes())
    tampered[-1] ^= 0xFF
    bad.write_bytes(bytes(tampered))
    result = rotate_files([good, bad], ring.with_new_key("k2"))
    assert result.rotated == [good]
    assert [path for path, _ in result.failed] == [bad]
    assert bad.read_bytes() == bytes(tampered)


def test_key_ring_formats_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = generate_key_file(tmp_path / "keys.json", key_id="k1").with_new_key("k2")
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    with pytest.raises(EncryptionError, match="already exists"):
        generate_key_file(tmp_path / "keys.json")
    ring.save(tmp_path / "keys.json")
    from_json = KeyRing.from_file(tmp_path / "keys.json")
    assert from_json.key_ids == ["k1", "k2"]
    assert from_json.current_key_id == "k2"

    entries = [f"{k}:{base64.b64encode(ring.key(k)).decode()}" for k in ("k1", "k2")]
    (tmp_path / "keys.txt").write_text("\n".join(["# old key first, current key last", *entries]))
    (tmp_path / "keys.txt").chmod(0o644)
    with capture_logs() as logs:
        from_lines = KeyRing.from_file(tmp_path / "keys.txt")
    assert any(entry["event"] == "key file readable by others" for entry in logs)
    blob = encrypt_bytes(SECRET, from_json, associated_data=b"x")
    assert decrypt_bytes(blob, from_lines, associated_data=b"x") == SECRET

    monkeypatch.setenv("HOSPITAL_KEYS", ",".join(entries))
    assert keyring_from_variable("HOSPITAL_KEYS").current_key_id == "k2"
    monkeypatch.delenv("HOSPITAL_KEYS")
    with pytest.raises(EncryptionError, match="not set"):
        keyring_from_variable("HOSPITAL_KEYS")
    with pytest.raises(EncryptionError, match="16 bytes"):
        KeyRing.from_text(f"k1:{base64.b64encode(bytes(16)).decode()}")
    with pytest.raises(EncryptionError, match="ID:BASE64"):
        KeyRing.from_text("not-a-key")
    assert entries[0].split(":")[1] not in repr(ring)


def test_the_edge_reads_the_variables_and_follows_a_rotated_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What every entry point does: read the environment once, pass the source down."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv(FILE_ENV_VAR, raising=False)
    assert keyring_from_environment() is None
    key_file = tmp_path / "keys.json"
    ring = generate_key_file(key_file, key_id="k1")
    monkeypatch.setenv(FILE_ENV_VAR, str(key_file))
    source = keyring_from_environment()
    assert isinstance(source, KeyFile)
    assert current_keyring(source).current_key_id == "k1"
    ring.with_new_key("k2").save(key_file)  # `fedllm keys rotate` in another process
    assert current_keyring(source).current_key_id == "k2"  # no restart needed
    monkeypatch.setenv(ENV_VAR, KeyRing.generate("k9").to_json())
    assert current_keyring(keyring_from_environment()).current_key_id == "k9"  # variable wins

    missing = {FILE_ENV_VAR: str(tmp_path / "gone.json")}
    with pytest.raises(EncryptionError, match=r"FEDLLM_ENCRYPTION_KEY_FILE: no key file"):
        keyring_from_environment(missing)  # at start, before anything is written
    assert keyring_from_environment({}) is None


class _Base(DeclarativeBase):
    pass


class _Event(_Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event: Mapped[str] = mapped_column(Text)


def test_encrypted_json_column_in_sqlite(tmp_path: Path, ring: KeyRing) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    _Base.metadata.create_all(engine)
    payload = {"kind": "sampled_gaussian", "noise_multiplier": 1.1, "patient": "4711"}
    events = EncryptedJSON(ring, name="events.event")

    def read(row_id: int, codec: EncryptedJSON) -> object:
        with Session(engine) as session:
            return codec.loads(
                session.scalars(select(_Event.event).where(_Event.id == row_id)).one()
            )

    with Session(engine) as session:
        session.add_all(
            [_Event(id=1, event=events.dumps(payload)), _Event(id=2, event=events.dumps({"n": 2}))]
        )
        session.commit()
    assert read(1, events) == payload
    with engine.connect() as conn:
        raw = conn.execute(text("SELECT event FROM events WHERE id = 1")).scalar_one()
    assert "4711" not in raw
    assert "noise_multiplier" not in raw
    assert base64.b64decode(raw).startswith(MAGIC)
    with pytest.raises(IntegrityError):  # bound to its column: another column refuses it
        EncryptedJSON(ring, name="other.event").loads(raw)

    with engine.begin() as conn:  # an attacker editing the database file
        tampered = bytearray(base64.b64decode(raw))
        tampered[-1] ^= 1
        conn.execute(
            text("UPDATE events SET event = :v WHERE id = 2"),
            {"v": base64.b64encode(bytes(tampered)).decode()},
        )
        conn.execute(
            text("INSERT INTO events (id, event) VALUES (3, :v)"), {"v": json.dumps(payload)}
        )
    with pytest.raises(IntegrityError):
        read(2, events)
    with pytest.raises(IntegrityError, match="plaintext"):
        read(3, events)
    assert read(3, EncryptedJSON(ring, name="events.event", accept_plaintext=True)) == payload
    with pytest.raises(IntegrityError):
        read(1, EncryptedJSON(KeyRing.generate(ring.current_key_id), name="events.event"))
    plain = EncryptedJSON(None, name="events.event")  # no key ring: plaintext rows only
    assert read(3, plain) == payload
    with pytest.raises(EncryptionError, match="no key ring"):
        read(1, plain)


def test_cli_generate_encrypt_rotate_decrypt(tmp_path: Path) -> None:
    runner = CliRunner()
    keys = tmp_path / "keys.json"
    data_dir = tmp_path / "artifacts"
    data_dir.mkdir()
    plain = data_dir / "adapter.bin"
    plain.write_bytes(SECRET)
    assert runner.invoke(keys_app, ["generate", "--out", str(keys)]).exit_code == 0
    result = runner.invoke(keys_app, ["encrypt", str(plain), "--keys", str(keys)])
    assert result.exit_code == 0, result.output
    old_id = key_id_of(plain.read_bytes())

    result = runner.invoke(keys_app, ["rotate", str(data_dir), "--keys", str(keys), "--drop-old"])
    assert result.exit_code == 0, result.output
    ring = KeyRing.from_file(keys)
    assert ring.key_ids == [ring.current_key_id] != [old_id]
    assert key_id_of(plain.read_bytes()) == ring.current_key_id

    out = tmp_path / "adapter.plain"
    result = runner.invoke(
        keys_app, ["decrypt", str(plain), "--keys", str(keys), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == SECRET
    result = runner.invoke(keys_app, ["decrypt", str(out), "--keys", str(keys)])
    assert result.exit_code == 2
    assert "not a fedllm-encrypted file" in result.output
