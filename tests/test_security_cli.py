"""`fedllm users` and `fedllm audit` through the real typer app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedllm.cli.app import app
from fedllm.security.audit import AuditLog
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


def write_audit(path: Path) -> str:
    with AuditLog(path, b"r" * 32) as log:
        for n in range(3):
            log.record("inference", user="alice", prompt=f"question {n}")
        return log.head


def test_audit_verify_ok(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    head = write_audit(path)
    result = runner.invoke(app, ["audit", "verify", str(path)])
    assert result.exit_code == 0, result.output
    assert "3 entries" in result.output
    assert head in result.output.replace("\n", "")
    as_json = runner.invoke(app, ["audit", "verify", str(path), "--json"])
    assert json.loads(as_json.output) == {
        "ok": True,
        "entries": 3,
        "head": head,
        "error": None,
        "line": None,
    }


def test_audit_verify_tampered(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_audit(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2])
    result = runner.invoke(app, ["audit", "verify", str(path)])
    assert result.exit_code == 1
    assert "line 2" in result.output
    as_json = json.loads(runner.invoke(app, ["audit", "verify", str(path), "--json"]).output)
    assert (as_json["ok"], as_json["line"]) == (False, 2)


def test_audit_verify_truncated_against_anchor(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    head = write_audit(path)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    assert runner.invoke(app, ["audit", "verify", str(path)]).exit_code == 0
    anchored = runner.invoke(app, ["audit", "verify", str(path), "--expected-head", head])
    assert anchored.exit_code == 1
    assert "anchored head" in anchored.output


def test_audit_verify_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", "verify", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert "cannot read" in result.output
