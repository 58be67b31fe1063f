"""The HMAC-chained audit log: redaction, caps, aggregated failures, chaining across reopen,
and tamper detection (with and without the key)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fedllm.security.audit import (
    GENESIS_HASH,
    MAX_LIST_ITEMS,
    MAX_STRING_CHARS,
    AuditFormatError,
    AuditLog,
    AuditLogError,
    canonical_json,
    chain_key,
    entry_mac,
    legacy_entry_hash,
    redaction_digest,
    verify_audit_log,
)

KEY = b"k" * 32
CHAIN = chain_key(KEY)
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
    assert entries[1]["prev"] == entries[0]["mac"] == entry_mac(CHAIN, entries[0])
    assert entries[1]["ts"].endswith("+00:00")
    assert entries[1]["fields"]["privacy_cost"] == 0.5
    result = verify_audit_log(path, KEY)
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
    assert json.loads(lines[3])["prev"] == json.loads(lines[2])["mac"]
    assert verify_audit_log(path, KEY).entries == 4


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
    result = verify_audit_log(path, KEY)
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
    result = verify_audit_log(path, KEY)
    assert not result.ok
    assert result.line == 3
    assert "MAC mismatch" in result.error
    assert result.entries == 2


def test_edited_field_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    entry = json.loads(lines[1])
    entry["fields"]["cost"] = 99.0
    entry["mac"] = entry_mac(CHAIN, entry)
    lines[1] = json.dumps(entry) + "\n"
    rewrite(path, lines)
    result = verify_audit_log(path, KEY)
    assert (result.ok, result.line) == (False, 3)
    assert "chain broken" in result.error


def test_edited_hash_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    entry = json.loads(lines[3])
    entry["mac"] = "f" * 64
    lines[3] = json.dumps(entry) + "\n"
    rewrite(path, lines)
    result = verify_audit_log(path, KEY)
    assert (result.ok, result.line) == (False, 4)


@pytest.mark.parametrize("index", [0, 2])
def test_deleted_line_is_detected(tmp_path: Path, index: int) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    del lines[index]
    rewrite(path, lines)
    result = verify_audit_log(path, KEY)
    assert (result.ok, result.line) == (False, index + 1)
    assert "sequence number" in result.error


def test_swapped_lines_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    lines[1], lines[2] = lines[2], lines[1]
    rewrite(path, lines)
    result = verify_audit_log(path, KEY)
    assert (result.ok, result.line) == (False, 2)


def test_inserted_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    forged = json.loads(lines[1])
    forged["fields"]["user"] = "mallory"
    forged["mac"] = entry_mac(CHAIN, forged)
    lines.insert(2, json.dumps(forged) + "\n")
    rewrite(path, lines)
    result = verify_audit_log(path, KEY)
    assert (result.ok, result.line) == (False, 3)


def test_garbage_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    lines[1] = "not json\n"
    rewrite(path, lines)
    result = verify_audit_log(path, KEY)
    assert (result.ok, result.line) == (False, 2)
    assert "JSON" in result.error


def test_tail_truncation_needs_an_anchored_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    anchored_head = verify_audit_log(path, KEY).head
    rewrite(path, lines[:3])
    # The chain alone cannot tell a shorter log from a truncated one...
    assert verify_audit_log(path, KEY).ok
    # ...the head recorded elsewhere can.
    result = verify_audit_log(path, KEY, expected_head=anchored_head)
    assert not result.ok
    assert "anchored head" in result.error
    # A log that grew after the anchor was taken still verifies against it.
    write_log(tmp_path / "grown.jsonl", 3)
    early_head = verify_audit_log(tmp_path / "grown.jsonl", KEY).head
    with AuditLog(tmp_path / "grown.jsonl", KEY) as log:
        log.record("later")
    assert verify_audit_log(tmp_path / "grown.jsonl", KEY, expected_head=early_head).ok


def test_torn_last_line_blocks_appending(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path, 2)
    rewrite(path, [*lines, lines[1][:20]])
    with pytest.raises(AuditLogError, match="incomplete"):
        AuditLog(path, KEY)
    result = verify_audit_log(path, KEY)
    assert (result.ok, result.line) == (False, 3)


def unkeyed_rewrite(lines: list[str], index: int, edit: dict) -> list[str]:
    """`lines` with entry `index` edited and every later link recomputed, as someone without
    the key would: plain SHA-256 in place of each MAC."""
    entries = [json.loads(line) for line in lines]
    entries[index]["fields"].update(edit)
    previous = entries[index - 1]["mac"] if index else GENESIS_HASH
    for entry in entries[index:]:
        entry["prev"] = previous
        entry["mac"] = previous = legacy_entry_hash({**entry, "hash": ""})
    return [canonical_json(entry).decode() + "\n" for entry in entries]


def test_rewrite_without_the_key_is_detected_with_no_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    rewrite(path, unkeyed_rewrite(lines, 1, {"user": "mallory"}))
    result = verify_audit_log(path, KEY)
    assert (result.ok, result.line) == (False, 2)
    assert "MAC mismatch" in result.error
    # The same rewrite with the key verifies: the key is what a forger lacks.
    entries = [json.loads(line) for line in lines]
    entries[1]["fields"]["user"] = "mallory"
    previous = entries[0]["mac"]
    for entry in entries[1:]:
        entry["prev"] = previous
        entry["mac"] = previous = entry_mac(CHAIN, entry)
    rewrite(path, [canonical_json(entry).decode() + "\n" for entry in entries])
    assert verify_audit_log(path, KEY).ok
    # The wrong key fails at the first line.
    assert verify_audit_log(path, b"w" * 32).line == 1


def test_verification_needs_the_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    with pytest.raises(AuditFormatError, match="audit key"):
        verify_audit_log(path)
    with pytest.raises(AuditFormatError, match="keyed audit log"):
        verify_audit_log(path, legacy=True)


def write_legacy(path: Path, count: int = 3) -> str:
    """A log in the pre-v2 format: SHA-256 chain, ``hash`` key, no version."""
    previous, lines = GENESIS_HASH, []
    for seq in range(1, count + 1):
        entry = {"seq": seq, "ts": "2026-01-01T00:00:00+00:00", "event": "e", "fields": {}}
        entry["prev"] = previous
        entry["hash"] = previous = legacy_entry_hash(entry)
        lines.append(canonical_json(entry).decode() + "\n")
    rewrite(path, lines)
    return previous


def test_legacy_logs_are_refused_unless_checked_as_legacy(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    head = write_legacy(path)
    with pytest.raises(AuditFormatError, match="unkeyed"):
        verify_audit_log(path, KEY)
    result = verify_audit_log(path, legacy=True, expected_head=head)
    assert (result.ok, result.entries, result.head, result.keyed) == (True, 3, head, False)
    with pytest.raises(AuditLogError, match="unkeyed audit log"):
        AuditLog(path, KEY)


def test_reopening_with_another_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    with pytest.raises(AuditLogError, match="does not verify under this audit key"):
        AuditLog(path, b"o" * 32)


def fields_of(line: str) -> dict:
    return json.loads(line)["fields"]


def test_every_stored_string_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY) as log:
        log.record(
            "admin_denied",
            user="u" * 300_000,
            path="/" + "p" * 60_000,
            nested={"k" * 1000: ["v" * 1000] * 500},
            prompt="x" * 100_000,
        )
    line = path.read_text()
    # About 1 MB in, a bounded line out: 4 capped strings, 64 capped list items, digests.
    assert len(line) < (MAX_LIST_ITEMS + 8) * (MAX_STRING_CHARS + 20) + 1000
    assert fields_of(line)["nested"]["k" * MAX_STRING_CHARS + "…[+744 chars]"][-1] == (
        "…[+436 items]"
    )
    fields = fields_of(line)
    assert fields["user"].startswith("u" * MAX_STRING_CHARS + "…[+")
    assert fields["path"].endswith(f"[+{60_001 - MAX_STRING_CHARS} chars]")
    # The prompt is digested from its full value, before any cap.
    assert fields["prompt"] == redaction_digest(KEY, "x" * 100_000)
    assert verify_audit_log(path, KEY).ok


def test_failures_are_aggregated_per_kind_and_client(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    typed_password = "Tr0ub4dor&3 typed as a name"
    with AuditLog(path, KEY, failure_window_s=3600) as log:
        for n in range(2000):
            log.count_failure("bad_token", "10.0.0.1", reason="malformed" if n % 2 else "expired")
        for n in range(50):
            log.count_failure("unknown_user", "10.0.0.2", unknown_user=f"{typed_password}{n}")
        log.count_failure("bad_password", "10.0.0.2", user="alice")
        assert path.read_text() == ""  # nothing written yet: counted in memory
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["auth_failures"] * 3  # written at close
    by_kind = {e["fields"]["kind"]: e["fields"] for e in entries}
    assert by_kind["bad_token"]["count"] == 2000
    assert by_kind["bad_token"]["reasons"] == {"malformed": 1000, "expired": 1000}
    assert by_kind["bad_token"]["client"] == "10.0.0.1"
    unknown = by_kind["unknown_user"]
    assert unknown["count"] == 50
    assert unknown["users"][0] == redaction_digest(KEY, typed_password + "0")
    assert len(unknown["users"]) + unknown["more_users"] == 50
    assert typed_password not in path.read_text()
    assert by_kind["bad_password"]["users"] == ["alice"]
    assert verify_audit_log(path, KEY).ok


def test_failures_are_flushed_periodically_and_before_the_next_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY, failure_window_s=0.2) as log:
        log.count_failure("bad_token", "10.0.0.1", reason="malformed")
        deadline = time.monotonic() + 5
        while not path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(path.read_text())["fields"]["count"] == 1
        log.count_failure("bad_token", "10.0.0.1", reason="malformed")
        time.sleep(0.25)
        log.record("token_issued", user="alice")
    events = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    assert events[:2] == ["auth_failures", "auth_failures"]
    assert "token_issued" in events
    assert verify_audit_log(path, KEY).ok


def test_distinct_clients_per_window_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, KEY, failure_window_s=3600) as log:
        for n in range(3000):
            log.count_failure("bad_token", f"client-{n}", reason="malformed")
    entries = [json.loads(line)["fields"] for line in path.read_text().splitlines()]
    assert len(entries) == 1025
    assert sum(entry["count"] for entry in entries) == 3000


def test_lone_surrogates_from_json_cannot_break_the_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    odd = json.loads('"x\\ud800y"')  # valid JSON, not encodable as UTF-8
    with AuditLog(path, KEY, failure_window_s=3600) as log:
        log.record("budget_read_denied", target=odd, prompt=odd)
        log.count_failure("unknown_user", "10.0.0.1", unknown_user=odd)
    first, second = (fields_of(line) for line in path.read_text().splitlines())
    assert first["target"] == "x?y"
    assert first["prompt"] == second["users"][0] == redaction_digest(KEY, odd)
    assert verify_audit_log(path, KEY).ok
