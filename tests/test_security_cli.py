"""`fedllm users` and `fedllm audit` through the real typer app."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedllm.cli.app import app
from fedllm.security.audit import AuditLog, legacy_entry_hash
from fedllm.security.users import AccountLockedError, Role, UserStore

PASSWORD = "correct horse battery"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'users.db'}"


def test_add_prompts_twice_and_stores_a_working_password(runner: CliRunner, db: str) -> None:
    result = runner.invoke(
        app,
        ["users", "add", "alice", "--role", "clinician", "--department", "cardiology", "--db", db],
        input=f"{PASSWORD}\n{PASSWORD}\n",
    )
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output  # hidden input is not echoed
    user = UserStore(db).authenticate("alice", PASSWORD)
    assert (user.role, user.department) == (Role.CLINICIAN, "cardiology")


def test_add_with_mismatched_confirmation_asks_again(runner: CliRunner, db: str) -> None:
    result = runner.invoke(
        app,
        ["users", "add", "alice", "--role", "admin", "--department", "it", "--db", db],
        input=f"{PASSWORD}\nsomething else\n{PASSWORD}\n{PASSWORD}\n",
    )
    assert result.exit_code == 0, result.output
    assert UserStore(db).authenticate("alice", PASSWORD).role is Role.ADMIN


def test_add_from_stdin_and_environment_database(
    runner: CliRunner, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDLLM_USERS_DB", db)
    args = ["users", "add", "bob", "--role", "researcher", "--department", "oncology"]
    result = runner.invoke(app, [*args, "--password-stdin"], input=f"{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert UserStore(db).authenticate("bob", PASSWORD).username == "bob"


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["bad name", "--role", "clinician", "--department", "x"], PASSWORD, "invalid username"),
        (["carol", "--role", "clinician", "--department", "x"], "short", "password must be"),
        (["carol", "--role", "surgeon", "--department", "x"], PASSWORD, "surgeon"),
    ],
)
def test_add_reports_bad_input_without_traceback(
    runner: CliRunner, db: str, args: list[str], stdin: str, message: str
) -> None:
    result = runner.invoke(
        app, ["users", "add", *args, "--password-stdin", "--db", db], input=stdin + "\n"
    )
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_add_duplicate_fails(runner: CliRunner, db: str) -> None:
    UserStore(db).add_user("alice", PASSWORD, Role.CLINICIAN, "cardiology")
    result = runner.invoke(
        app,
        [
            "users",
            "add",
            "alice",
            "--role",
            "admin",
            "--department",
            "it",
            "--db",
            db,
            "--password-stdin",
        ],
        input=PASSWORD + "\n",
    )
    assert result.exit_code == 2
    assert "already exists" in result.output


def test_list_remove_and_unlock(runner: CliRunner, db: str) -> None:
    store = UserStore(db, max_failed_logins=1, lockout_s=600)
    store.add_user("alice", PASSWORD, Role.CLINICIAN, "cardiology")
    store.add_user("bob", PASSWORD, Role.RESEARCHER, "oncology")
    with pytest.raises(AccountLockedError):
        store.authenticate("alice", "wrong password")

    listed = runner.invoke(app, ["users", "list", "--db", db, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["username"]: row for row in json.loads(listed.output)}
    assert rows["alice"]["locked_until"] is not None
    assert rows["bob"] == {
        "username": "bob",
        "role": "researcher",
        "department": "oncology",
        "failed_logins": 0,
        "locked_until": None,
    }
    table = runner.invoke(app, ["users", "list", "--db", db])
    assert "alice" in table.output
    assert "oncology" in table.output

    assert runner.invoke(app, ["users", "unlock", "alice", "--db", db]).exit_code == 0
    assert store.authenticate("alice", PASSWORD).username == "alice"

    assert runner.invoke(app, ["users", "remove", "bob", "--db", db]).exit_code == 0
    assert store.get("bob") is None
    missing = runner.invoke(app, ["users", "remove", "bob", "--db", db])
    assert missing.exit_code == 2
    assert "no user" in missing.output


def test_unopenable_database_is_a_clear_error(runner: CliRunner, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing-dir' / 'users.db'}"
    result = runner.invoke(app, ["users", "list", "--db", url])
    assert result.exit_code == 2
    assert "cannot open user database" in result.output
    assert "Traceback" not in result.output


AUDIT_KEY = b"r" * 32


def write_audit(path: Path) -> str:
    with AuditLog(path, AUDIT_KEY) as log:
        for n in range(3):
            log.record("inference", user="alice", prompt=f"question {n}")
        return log.head


def key_file(tmp_path: Path) -> str:
    path = tmp_path / "audit.key"
    path.write_bytes(AUDIT_KEY + b"\n")
    return str(path)


def test_audit_verify_ok(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    head = write_audit(path)
    key = key_file(tmp_path)
    result = runner.invoke(app, ["audit", "verify", str(path), "--key-file", key])
    assert result.exit_code == 0, result.output
    assert "3 entries" in result.output
    assert head in result.output.replace("\n", "")
    as_json = runner.invoke(app, ["audit", "verify", str(path), "--key-file", key, "--json"])
    assert json.loads(as_json.output) == {
        "ok": True,
        "entries": 3,
        "head": head,
        "error": None,
        "line": None,
        "keyed": True,
    }
    from_env = runner.invoke(
        app,
        ["audit", "verify", str(path), "--key-env", "AUDIT_TEST_KEY"],
        env={"AUDIT_TEST_KEY": AUDIT_KEY.decode()},
    )
    assert from_env.exit_code == 0, from_env.output


def test_audit_verify_tampered(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_audit(path)
    key = key_file(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2])
    result = runner.invoke(app, ["audit", "verify", str(path), "--key-file", key])
    assert result.exit_code == 1
    assert "line 2" in result.output
    as_json = json.loads(
        runner.invoke(app, ["audit", "verify", str(path), "--key-file", key, "--json"]).output
    )
    assert (as_json["ok"], as_json["line"]) == (False, 2)


def test_audit_verify_truncated_against_anchor(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    head = write_audit(path)
    key = key_file(tmp_path)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    assert runner.invoke(app, ["audit", "verify", str(path), "--key-file", key]).exit_code == 0
    anchored = runner.invoke(
        app, ["audit", "verify", str(path), "--key-file", key, "--expected-head", head]
    )
    assert anchored.exit_code == 1
    assert "anchored head" in anchored.output


def test_audit_verify_without_a_key_or_with_a_wrong_one(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_audit(path)
    missing = runner.invoke(app, ["audit", "verify", str(path)])
    assert missing.exit_code == 2
    assert "--key-file" in missing.output
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"w" * 32)
    result = runner.invoke(app, ["audit", "verify", str(path), "--key-file", str(wrong)])
    assert result.exit_code == 1
    assert "MAC mismatch" in result.output
    short = tmp_path / "short.key"
    short.write_bytes(b"short")
    result = runner.invoke(app, ["audit", "verify", str(path), "--key-file", str(short)])
    assert result.exit_code == 2
    assert "at least 16 bytes" in result.output
    unreadable = runner.invoke(
        app, ["audit", "verify", str(path), "--key-file", str(tmp_path / "nope.key")]
    )
    assert unreadable.exit_code == 2
    assert "Traceback" not in unreadable.output


def test_audit_verify_legacy_log(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    previous = "0" * 64
    lines = []
    for seq in (1, 2):
        entry = {"seq": seq, "ts": "2026-01-01T00:00:00+00:00", "event": "e", "fields": {}}
        entry["prev"] = previous
        entry["hash"] = previous = legacy_entry_hash(entry)
        lines.append(json.dumps(entry) + "\n")
    path.write_text("".join(lines))
    refused = runner.invoke(app, ["audit", "verify", str(path), "--key-file", key_file(tmp_path)])
    assert refused.exit_code == 2
    assert "unkeyed (legacy)" in refused.output
    legacy = runner.invoke(app, ["audit", "verify", str(path), "--legacy"])
    assert legacy.exit_code == 0, legacy.output
    assert "2 entries" in " ".join(legacy.output.split())
    assert "warning" in legacy.output


def test_audit_verify_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["audit", "verify", str(tmp_path / "nope.jsonl"), "--key-file", key_file(tmp_path)]
    )
    assert result.exit_code == 2
    assert "cannot read" in result.output


REPO = Path(__file__).resolve().parents[1]


def documented_verify_commands() -> list[str]:
    """Every `fedllm audit verify` command in README.md and docs/, in document order."""
    commands = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        in_block = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_block = not in_block
            elif in_block and line.startswith("fedllm audit verify "):
                commands.append(line)
            elif not in_block:
                commands += re.findall(r"`(fedllm audit verify [^`]*)`", line)
    return commands


def test_documented_audit_commands_run_as_written(tmp_path: Path) -> None:
    """Each documented command, through bash and the installed `fedllm`, against a router-style
    layout: router-audit.jsonl, credentials/router/audit.key, an old unkeyed log."""
    key_path = tmp_path / "credentials" / "router" / "audit.key"
    key_path.parent.mkdir(parents=True)
    key_path.write_bytes(AUDIT_KEY + b"\n")
    write_audit(tmp_path / "router-audit.jsonl")
    previous = "0" * 64
    entry = {"seq": 1, "ts": "2026-01-01T00:00:00+00:00", "event": "e", "fields": {}}
    entry["prev"] = previous
    entry["hash"] = legacy_entry_hash(entry)
    (tmp_path / "router-audit.jsonl.old").write_text(json.dumps(entry) + "\n")
    commands = documented_verify_commands()
    assert any("--expected-head" in command for command in commands)
    assert any("--legacy" in command for command in commands)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FEDLLM_AUDIT_KEY": AUDIT_KEY.decode(),
    }
    for command in commands:
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    assert len((tmp_path / "anchored-head.txt").read_text().strip()) == 64
