"""The audit log: who asked what, when, in an append-only, hash-chained JSON-lines file.

Every entry carries the SHA-256 hash of the previous one, so editing, deleting, inserting or
reordering any entry breaks the chain at that point and `verify_audit_log` names the line.
Clinical text never reaches the file: fields that may hold it (`SENSITIVE_FIELDS`, at any
depth) are replaced by an HMAC-SHA256 digest under a redaction key. An auditor holding the key
can tell that two requests carried the same prompt, or check a suspected prompt, but nobody
can read one from the log.

Entry format (one JSON object per line)::

    {"seq": 1, "ts": "2026-01-01T00:00:00.000000+00:00", "event": "inference",
     "fields": {...}, "prev": "<64 hex>", "hash": "<64 hex>"}

``seq`` counts from 1, ``prev`` of the first entry is 64 zeros, and ``hash`` is the SHA-256 of
the entry without ``hash`` serialised as canonical JSON (sorted keys, no spaces, UTF-8).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SENSITIVE_FIELDS = frozenset({"prompt", "response", "messages", "password", "text"})
GENESIS_HASH = "0" * 64
REDACTION_PREFIX = "hmac-sha256:"
MIN_REDACTION_KEY_BYTES = 16
_ENTRY_KEYS = frozenset({"seq", "ts", "event", "fields", "prev", "hash"})
# The last entry is found by reading at most this much from the end of the file.
_TAIL_CHUNK = 1 << 16


class AuditLogError(RuntimeError):
    """The log cannot be opened for appending (corrupt tail, or another writer holds it)."""


def canonical_json(value: Any) -> bytes:
    """The one serialisation that hashes and digests are computed over."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 (hex) of `entry` without its ``hash`` key."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def redaction_digest(redaction_key: bytes, value: Any) -> str:
    """``hmac-sha256:<hex>`` of `value` (a string's UTF-8, anything else its canonical JSON).

    Auditors holding the key use this to check whether a given prompt appears in the log.
    """
    data = value.encode("utf-8") if isinstance(value, str) else canonical_json(value)
    return REDACTION_PREFIX + hmac.new(redaction_key, data, hashlib.sha256).hexdigest()


def _redact(value: Any, redaction_key: bytes) -> Any:
    """`value` with every sensitive key's value, at any depth, replaced by its digest."""
    if isinstance(value, dict):
        return {
            str(key): (
                redaction_digest(redaction_key, item)
                if key in SENSITIVE_FIELDS
                else _redact(item, redaction_key)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(item, redaction_key) for item in value]
    return value


class AuditLog:
    """Appends redacted, hash-chained entries; one writer per file, many threads.

    Each entry is written with one ``write`` and flushed to disk (fsync) before `record`
    returns, so an acknowledged request is never missing from the log after a crash. Reopening
    an existing log continues its chain. An exclusive ``flock`` stops a second process from
    appending concurrently, which would fork the chain.
    """

    def __init__(self, path: Path, redaction_key: bytes) -> None:
        if not isinstance(redaction_key, bytes) or len(redaction_key) < MIN_REDACTION_KEY_BYTES:
            raise ValueError(
                f"redaction_key must be at least {MIN_REDACTION_KEY_BYTES} random bytes"
            )
        self._path = Path(path)
        self._key = redaction_key
        self._lock = threading.Lock()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise AuditLogError(f"{self._path} is already open for writing elsewhere") from None
        try:
            self._seq, self._head = _last_entry(self._fd, self._path)
        except AuditLogError:
            os.close(self._fd)
            raise

    @property
    def path(self) -> Path:
        """The log file."""
        return self._path

    @property
    def head(self) -> str:
        """Hash of the latest entry (64 zeros for an empty log): the value to anchor elsewhere."""
        with self._lock:
            return self._head

    def record(self, event: str, **fields: Any) -> None:
        """Append one entry; sensitive fields are digested, values must be JSON-serialisable."""
        if not isinstance(event, str) or not event:
            raise ValueError("event must be a non-empty string")
        redacted = _redact(fields, self._key)
        with self._lock:
            if self._fd < 0:
                raise AuditLogError(f"{self._path} is closed")
            entry = {
                "seq": self._seq + 1,
                "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
                "event": event,
                "fields": redacted,
                "prev": self._head,
            }
            entry["hash"] = entry_hash(entry)
            line = canonical_json(entry) + b"\n"
            written = os.write(self._fd, line)
            if written != len(line):
                raise AuditLogError(f"short write to {self._path}")
            os.fsync(self._fd)
            self._seq = entry["seq"]
            self._head = entry["hash"]

    def close(self) -> None:
        """Release the file and its lock; further `record` calls fail."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _last_entry(fd: int, path: Path) -> tuple[int, str]:
    """(seq, hash) of the last entry of an open log; (0, GENESIS_HASH) when it is empty."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, GENESIS_HASH
    start = max(0, size - _TAIL_CHUNK)
    tail = os.pread(fd, size - start, start)
    while not tail.rstrip(b"\n").count(b"\n") and start > 0:
        start = max(0, start - _TAIL_CHUNK)
        tail = os.pread(fd, size - start, start)
    if not tail.endswith(b"\n"):
        raise AuditLogError(
            f"{path} ends with an incomplete entry (interrupted write?); "
            "run `fedllm audit verify` and repair it before appending"
        )
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        entry = json.loads(last)
        valid = (
            isinstance(entry, dict)
            and set(entry) == _ENTRY_KEYS
            and entry_hash(entry) == entry["hash"]
            and isinstance(entry["seq"], int)
        )
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise AuditLogError(
            f"{path}: the last entry is corrupt; run `fedllm audit verify` before appending"
        )
    return entry["seq"], entry["hash"]


@dataclass(frozen=True)
class AuditVerification:
    """Result of checking a log's chain.

    `head` is the hash of the last valid entry. Cutting entries off the *end* of a log leaves a
    valid, shorter chain, so truncation of the tail is only detectable against a head hash
    recorded outside the log (a ticket, another host, a signed note): pass it back as
    ``expected_head`` to `verify_audit_log`.
    """

    ok: bool
    entries: int
    head: str
    error: str | None = None  # "line N: reason" when not ok
    line: int | None = None


def verify_audit_log(path: Path, *, expected_head: str | None = None) -> AuditVerification:
    """Check every entry's hash, sequence and link to its predecessor.

    Detects any edit, deletion, insertion or reordering of entries, including removal of the
    first ones; the first failure is reported with its line number. Removal of the last
    entries is invisible to the chain itself: when `expected_head` (a head recorded earlier)
    is given, the log must still contain the entry with that hash.

    Raises:
        OSError: the file cannot be read.
    """
    previous = GENESIS_HASH
    entries = 0
    anchored = expected_head is None
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            reason = _check_line(raw, number, previous)
            if reason is not None:
                return AuditVerification(
                    ok=False,
                    entries=entries,
                    head=previous,
                    error=f"line {number}: {reason}",
                    line=number,
                )
            previous = json.loads(raw)["hash"]
            entries = number
            anchored = anchored or previous == expected_head
    if not anchored:
        return AuditVerification(
            ok=False,
            entries=entries,
            head=previous,
            error=f"line {entries + 1}: the anchored head {expected_head} is missing "
            "(entries were removed from the end of the log)",
            line=entries + 1,
        )
    return AuditVerification(ok=True, entries=entries, head=previous)


def _check_line(raw: bytes, number: int, previous: str) -> str | None:
    """Why line `number` is not a valid successor of the entry hashed `previous`, or None."""
    if not raw.endswith(b"\n"):
        return "incomplete last line (interrupted write or truncation)"
    try:
        entry = json.loads(raw)
    except ValueError:
        return "not a JSON object"
    if not isinstance(entry, dict):
        return "not a JSON object"
    if set(entry) != _ENTRY_KEYS:
        return f"wrong keys {sorted(entry)}; expected {sorted(_ENTRY_KEYS)}"
    if entry["seq"] != number:
        return (
            f"sequence number {entry['seq']!r} where {number} was expected "
            "(entries deleted, inserted or reordered)"
        )
    if entry["prev"] != previous:
        return "chain broken: prev does not match the previous entry's hash"
    try:
        intact = isinstance(entry["hash"], str) and entry_hash(entry) == entry["hash"]
    except ValueError:  # NaN or Infinity slipped in: never written by AuditLog
        intact = False
    return None if intact else "hash mismatch: the entry was modified"
