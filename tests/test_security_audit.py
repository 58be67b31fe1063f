"""The hash-chained audit log: redaction, chaining across reopen, and tamper detection."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from fedllm.security.audit import (
    GENESIS_HASH,
    AuditLog,
    AuditLogError,
    entry_hash,
    redaction_digest,
    verify_audit_log,
)

KEY = b"k" * 32
PROMPT = "Patient 4711 (J. Doe) HIV positive, on tenofovir: next steps?"


def write_log(path: Path, count: int = 5) -> list[str]:
    with AuditLog(path, KEY) as log:
        for i in range(count):
            log.record("inference", user="alice", prompt=f"{PROMPT} #{i}", node="h1", cost=0.0)
    return path.read_text().splitlines(keepends=True)


def rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines))


def test_entries_are_chained_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY) as log:
        assert log.head == GENESIS_HASH
        log.record("login", user="alice", outcome="ok")
        log.record("inference", user="alice", prompt=PROMPT, privacy_cost=0.5)
        head = log.head
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["seq"] for e in entries] == [1, 2]
    assert entries[0]["prev"] == GENESIS_HASH
    assert entries[1]["prev"] == entries[0]["hash"] == entry_hash(entries[0])
    assert entries[1]["ts"].endswith("+00:00")
    assert entries[1]["fields"]["privacy_cost"] == 0.5
    result = verify_audit_log(path)
    assert result.ok, result.error
    assert (result.entries, result.head) == (2, head)


def test_sensitive_fields_never_appear_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    messages = [{"role": "user", "content": "chest pain since Tuesday"}]
    with AuditLog(path, KEY) as log:
        log.record(
            "chat",
            messages=messages,
            response="Consider troponin",
            password="hunter2hunter2",
            request={"prompt": PROMPT, "text": "nested secret"},
        )
        log.record("inference", prompt=PROMPT)
    content = path.read_text()
    for secret in ("HIV", "chest pain", "troponin", "hunter2", "nested secret", "4711"):
        assert secret not in content
    first, second = (json.loads(line)["fields"] for line in content.splitlines())
    assert first["request"]["prompt"] == second["prompt"] == redaction_digest(KEY, PROMPT)
    assert first["messages"] == redaction_digest(KEY, messages)
    assert second["prompt"].startswith("hmac-sha256:")
    # Without the key the digest does not match: a different key gives another value.
    assert redaction_digest(b"x" * 32, PROMPT) != second["prompt"]


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    with AuditLog(path, KEY) as log:
        log.record("restart")
    lines = path.read_text().splitlines()
    assert json.loads(lines[3])["seq"] == 4
    assert json.loads(lines[3])["prev"] == json.loads(lines[2])["hash"]
    assert verify_audit_log(path).entries == 4


def test_concurrent_records_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY) as log:
        threads = [
            threading.Thread(target=lambda: [log.record("ping", n=n) for n in range(10)])
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    result = verify_audit_log(path)
    assert result.ok, result.error
    assert result.entries == 40


def test_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY), pytest.raises(AuditLogError, match="already open"):
        AuditLog(path, KEY)


def test_short_redaction_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="redaction_key"):
        AuditLog(tmp_path / "audit.jsonl", b"short")


def test_edited_field_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    lines[2] = lines[2].replace('"user":"alice"', '"user":"mallory"')
    assert "mallory" in lines[2]
    rewrite(path, lines)
    result = verify_audit_log(path)
    assert not result.ok
    assert result.line == 3
    assert "hash mismatch" in result.error
    assert result.entries == 2


def test_edited_field_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    entry = json.loads(lines[1])
    entry["fields"]["cost"] = 99.0
    entry["hash"] = entry_hash(entry)
    lines[1] = json.dumps(entry) + "\n"
    rewrite(path, lines)
    result = verify_audit_log(path)
    assert (result.ok, result.line) == (False, 3)
    assert "chain broken" in result.error


def test_edited_hash_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    entry = json.loads(lines[3])
    entry["hash"] = "f" * 64
    lines[3] = json.dumps(entry) + "\n"
    rewrite(path, lines)
    result = verify_audit_log(path)
    assert (result.ok, result.line) == (False, 4)


@pytest.mark.parametrize("index", [0, 2])
def test_deleted_line_is_detected(tmp_path: Path, index: int) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    del lines[index]
    rewrite(path, lines)
    result = verify_audit_log(path)
    assert (result.ok, result.line) == (False, index + 1)
    assert "sequence number" in result.error


def test_swapped_lines_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    lines[1], lines[2] = lines[2], lines[1]
    rewrite(path, lines)
    result = verify_audit_log(path)
    assert (result.ok, result.line) == (False, 2)


def test_inserted_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    forged = json.loads(lines[1])
    forged["fields"]["user"] = "mallory"
    forged["hash"] = entry_hash(forged)
    lines.insert(2, json.dumps(forged) + "\n")
    rewrite(path, lines)
    result = verify_audit_log(path)
    assert (result.ok, result.line) == (False, 3)


def test_garbage_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    lines[1] = "not json\n"
    rewrite(path, lines)
    result = verify_audit_log(path)
    assert (result.ok, result.line) == (False, 2)
    assert "JSON" in result.error


def test_tail_truncation_needs_an_anchored_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    anchored_head = verify_audit_log(path).head
    rewrite(path, lines[:3])
    # The chain alone cannot tell a shorter log from a truncated one...
    assert verify_audit_log(path).ok
    # ...the head recorded elsewhere can.
    result = verify_audit_log(path, expected_head=anchored_head)
    assert not result.ok
    assert "anchored head" in result.error
    # A log that grew after the anchor was taken still verifies against it.
    write_log(tmp_path / "grown.jsonl", 3)
    early_head = verify_audit_log(tmp_path / "grown.jsonl").head
    with AuditLog(tmp_path / "grown.jsonl", KEY) as log:
        log.record("later")
    assert verify_audit_log(tmp_path / "grown.jsonl", expected_head=early_head).ok


def test_torn_last_line_blocks_appending(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path, 2)
    rewrite(path, [*lines, lines[1][:20]])
    with pytest.raises(AuditLogError, match="incomplete"):
        AuditLog(path, KEY)
    result = verify_audit_log(path)
    assert (result.ok, result.line) == (False, 3)
