"""The audit log: who asked what, when, in an append-only, HMAC-chained JSON-lines file.

Every entry carries the MAC of the previous one, and each MAC is an HMAC-SHA256 under a chain
key only the router holds (derived from the audit key). Editing, deleting, inserting or
reordering entries breaks the chain at that point and `verify_audit_log` names the line; unlike
a plain hash chain, rewriting the rest of the file after an edit does not help without the key.
Clinical text never reaches the file: fields that may hold it (`SENSITIVE_FIELDS`, at any
depth) are replaced by an HMAC-SHA256 digest under the audit key. An auditor holding the key
can tell that two requests carried the same prompt, or check a suspected prompt, but nobody
can read one from the log. Every stored string is capped at `MAX_STRING_CHARS`, so a client
cannot make the log grow by sending huge usernames or paths.

Unauthenticated failures (bad tokens, unknown users, wrong passwords) are not written one line
each: `AuditLog.count_failure` aggregates them per kind and client address, and one
``auth_failures`` entry per (kind, client) with a count is written when the window closes
(by a background flusher, or before the next entry) and when the log is closed.

Entry format (one JSON object per line)::

    {"v": 2, "seq": 1, "ts": "2026-01-01T00:00:00.000000+00:00", "event": "inference",
     "fields": {...}, "prev": "<64 hex>", "mac": "<64 hex>"}

``seq`` counts from 1, ``prev`` of the first entry is 64 zeros, and ``mac`` is the
HMAC-SHA256, under `chain_key`, of the entry without ``mac`` serialised as canonical JSON
(sorted keys, no spaces, UTF-8). Logs written before keyed chains (no ``v``, a SHA-256
``hash`` instead of ``mac``) are *legacy*: the router refuses to append to one, and
`verify_audit_log` checks one only when asked to with ``legacy=True``.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

logger = structlog.get_logger(__name__)

SENSITIVE_FIELDS = frozenset({"prompt", "response", "messages", "password", "text"})
GENESIS_HASH = "0" * 64
REDACTION_PREFIX = "hmac-sha256:"
MIN_REDACTION_KEY_BYTES = 16
FORMAT_VERSION = 2
# Not valid UTF-8 (0xff), so no redaction digest (of a string's UTF-8 or of canonical JSON)
# can ever equal the chain key: a client submitting this label as a prompt learns nothing.
CHAIN_KEY_LABEL = b"\xfffedllm audit chain key v2"
# Every string stored (values and keys, after redaction) is cut to this many characters.
MAX_STRING_CHARS = 256
MAX_LIST_ITEMS = 64
# Per aggregated failure entry: distinct users listed, distinct reasons counted.
MAX_FAILURE_USERS = 8
MAX_FAILURE_REASONS = 16
# Distinct (kind, client) pairs per window; further clients are counted under OTHER_CLIENTS.
MAX_FAILURE_KEYS = 1024
OTHER_CLIENTS = "(other clients)"
FAILURE_EVENT = "auth_failures"
DEFAULT_FAILURE_WINDOW_S = 60.0
_ENTRY_KEYS = frozenset({"v", "seq", "ts", "event", "fields", "prev", "mac"})
_LEGACY_KEYS = frozenset({"seq", "ts", "event", "fields", "prev", "hash"})
# The last entry is found by reading at most this much from the end of the file.
_TAIL_CHUNK = 1 << 16


class AuditLogError(RuntimeError):
    """The log cannot be opened for appending (corrupt tail, wrong key, legacy format, or
    another writer holds it)."""


class AuditFormatError(ValueError):
    """The log's format does not match how it is being verified (keyed vs legacy)."""


def canonical_json(value: Any) -> bytes:
    """The one serialisation that MACs and digests are computed over."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def chain_key(audit_key: bytes) -> bytes:
    """The key of the entry MACs, derived from the audit key under its own label."""
    return hmac.new(audit_key, CHAIN_KEY_LABEL, hashlib.sha256).digest()


def entry_mac(key: bytes, entry: dict[str, Any]) -> str:
    """HMAC-SHA256 (hex) under the chain `key` of `entry` without its ``mac`` key."""
    body = {name: value for name, value in entry.items() if name != "mac"}
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


def legacy_entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 (hex) of a legacy entry without its ``hash`` key (unkeyed, pre-v2 logs)."""
    body = {name: value for name, value in entry.items() if name != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def redaction_digest(redaction_key: bytes, value: Any) -> str:
    """``hmac-sha256:<hex>`` of `value` (a string's UTF-8, anything else its canonical JSON).

    Auditors holding the key use this to check whether a given prompt (or a username that
    failed to log in) appears in the log.
    """
    data = (
        value.encode("utf-8", "surrogatepass")
        if isinstance(value, str)
        else canonical_json(_bounded(value, b"", cap=False))
    )
    return REDACTION_PREFIX + hmac.new(redaction_key, data, hashlib.sha256).hexdigest()


def read_audit_key(*, file: Path | None = None, env: str | None = None) -> bytes:
    """The audit key from a file or an environment variable, stripped as the router reads it.

    Raises:
        ValueError: neither or both sources given, the variable is unset, or the key is short.
        OSError: the file cannot be read.
    """
    if (file is None) == (env is None):
        raise ValueError("give exactly one of a key file or a key environment variable")
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise ValueError(f"environment variable {env} is not set or empty")
        key = value.encode().strip()
    else:
        assert file is not None
        key = Path(file).expanduser().read_bytes().strip()
    if len(key) < MIN_REDACTION_KEY_BYTES:
        raise ValueError(f"the audit key must be at least {MIN_REDACTION_KEY_BYTES} bytes")
    return key


def _cap(text: str, cap: bool = True) -> str:
    """`text` as valid UTF-8 (a lone surrogate from JSON becomes "?"), cut to MAX_STRING_CHARS
    with a marker saying how much was dropped."""
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    if not cap or len(text) <= MAX_STRING_CHARS:
        return text
    return f"{text[:MAX_STRING_CHARS]}…[+{len(text) - MAX_STRING_CHARS} chars]"


def _bounded(value: Any, redaction_key: bytes, *, cap: bool = True) -> Any:
    """`value` with sensitive keys' values digested, strings made valid UTF-8 and (with `cap`)
    capped, and lists shortened; ``cap=False`` only cleans, for digesting whole values."""
    if isinstance(value, dict):
        return {
            _cap(str(key), cap): (
                redaction_digest(redaction_key, item)
                if key in SENSITIVE_FIELDS and cap
                else _bounded(item, redaction_key, cap=cap)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        if not cap:
            return [_bounded(item, redaction_key, cap=False) for item in value]
        items = [_bounded(item, redaction_key) for item in value[:MAX_LIST_ITEMS]]
        if len(value) > MAX_LIST_ITEMS:
            items.append(f"…[+{len(value) - MAX_LIST_ITEMS} items]")
        return items
    if isinstance(value, str):
        return _cap(value, cap)
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass
class _FailureCount:
    """One (kind, client) pair's failures in the current window."""

    count: int = 0
    first: str = ""
    last: str = ""
    reasons: dict[str, int] = field(default_factory=dict)
    users: list[str] = field(default_factory=list)
    more_users: int = 0

    def fields(self, kind: str, client: str, window_s: float) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": kind,
            "client": client,
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "window_s": window_s,
        }
        if self.reasons:
            data["reasons"] = dict(self.reasons)
        if self.users:
            data["users"] = list(self.users)
        if self.more_users:
            data["more_users"] = self.more_users
        return data


class AuditLog:
    """Appends redacted, HMAC-chained entries; one writer per file, many threads.

    Each entry is written with one ``write`` and flushed to disk (fsync) before `record`
    returns, so an acknowledged request is never missing from the log after a crash. Reopening
    an existing log continues its chain (its last entry must verify under this key). An
    exclusive ``flock`` stops a second process from appending concurrently, which would fork
    the chain. Failures counted with `count_failure` are written every `failure_window_s` by a
    daemon thread, before any later entry once the window has passed, and at `close`.
    """

    def __init__(
        self,
        path: Path,
        redaction_key: bytes,
        *,
        failure_window_s: float = DEFAULT_FAILURE_WINDOW_S,
    ) -> None:
        if not isinstance(redaction_key, bytes) or len(redaction_key) < MIN_REDACTION_KEY_BYTES:
            raise ValueError(
                f"redaction_key must be at least {MIN_REDACTION_KEY_BYTES} random bytes"
            )
        if not failure_window_s > 0:
            raise ValueError(f"failure_window_s must be > 0, got {failure_window_s!r}")
        self._path = Path(path)
        self._key = redaction_key
        self._chain_key = chain_key(redaction_key)
        self._window_s = float(failure_window_s)
        self._lock = threading.Lock()
        self._failures_lock = threading.Lock()
        self._failures: dict[tuple[str, str], _FailureCount] = {}
        self._window_start = time.monotonic()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise AuditLogError(f"{self._path} is already open for writing elsewhere") from None
        try:
            self._seq, self._head = _last_entry(self._fd, self._path, self._chain_key)
        except AuditLogError:
            os.close(self._fd)
            raise
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_periodically, name="audit-failure-flusher", daemon=True
        )
        self._flusher.start()

    @property
    def path(self) -> Path:
        """The log file."""
        return self._path

    @property
    def head(self) -> str:
        """MAC of the latest entry (64 zeros for an empty log): the value to anchor elsewhere."""
        with self._lock:
            return self._head

    def digest(self, value: Any) -> str:
        """`redaction_digest` of `value` under this log's key (for values kept only as digests)."""
        return redaction_digest(self._key, value)

    def record(self, event: str, **fields: Any) -> None:
        """Append one entry; sensitive fields are digested, values must be JSON-serialisable."""
        if not isinstance(event, str) or not event:
            raise ValueError("event must be a non-empty string")
        bounded = _bounded(fields, self._key)
        if time.monotonic() - self._window_start >= self._window_s:
            self.flush_failures()
        self._append([(_cap(event), bounded)])

    def count_failure(
        self,
        kind: str,
        client: str,
        *,
        user: str | None = None,
        unknown_user: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Count one unauthenticated failure; never blocks on the disk (event-loop safe).

        `user` is a known account name (stored as is); `unknown_user` is what a client typed
        that matches no account (possibly a password typed in the wrong field), stored only as
        its keyed digest.
        """
        name = self.digest(unknown_user) if unknown_user is not None else user
        with self._failures_lock:
            key = (kind, client)
            if key not in self._failures and len(self._failures) >= MAX_FAILURE_KEYS:
                key = (kind, OTHER_CLIENTS)
            counted = self._failures.setdefault(key, _FailureCount(first=_now()))
            counted.count += 1
            counted.last = _now()
            if reason is not None:
                reason = _cap(reason)
                if reason in counted.reasons or len(counted.reasons) < MAX_FAILURE_REASONS:
                    counted.reasons[reason] = counted.reasons.get(reason, 0) + 1
            if name is not None and name not in counted.users:
                if len(counted.users) < MAX_FAILURE_USERS:
                    counted.users.append(_cap(name))
                else:
                    counted.more_users += 1

    def flush_failures(self) -> None:
        """Write the aggregated failures counted so far (one entry per kind and client)."""
        with self._failures_lock:
            pending, self._failures = self._failures, {}
            self._window_start = time.monotonic()
        if pending:
            window = self._window_s
            self._append(
                [
                    (FAILURE_EVENT, _bounded(counted.fields(kind, client, window), self._key))
                    for (kind, client), counted in sorted(pending.items())
                ]
            )

    def close(self) -> None:
        """Write pending failure counts, release the file and its lock; `record` then fails."""
        self._stop.set()
        if self._flusher is not threading.current_thread():
            self._flusher.join()
        with self._lock:
            closed = self._fd < 0
        if not closed:
            self.flush_failures()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _append(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Chain, write (one write) and fsync `items` ((event, bounded fields)) in order."""
        with self._lock:
            if self._fd < 0:
                raise AuditLogError(f"{self._path} is closed")
            seq, head = self._seq, self._head
            lines = []
            for event, fields in items:
                seq += 1
                entry = {
                    "v": FORMAT_VERSION,
                    "seq": seq,
                    "ts": _now(),
                    "event": event,
                    "fields": fields,
                    "prev": head,
                }
                entry["mac"] = head = entry_mac(self._chain_key, entry)
                lines.append(canonical_json(entry) + b"\n")
            data = b"".join(lines)
            written = os.write(self._fd, data)
            if written != len(data):
                raise AuditLogError(f"short write to {self._path}")
            os.fsync(self._fd)
            self._seq, self._head = seq, head

    def _flush_periodically(self) -> None:
        """Daemon loop: write aggregated failures every window until the log closes."""
        while not self._stop.wait(self._window_s):
            try:
                self.flush_failures()
            except (OSError, AuditLogError) as error:  # disk full, log closed meanwhile
                logger.error("audit_failures_not_written", path=str(self._path), error=str(error))


def _last_entry(fd: int, path: Path, key: bytes) -> tuple[int, str]:
    """(seq, mac) of the last entry of an open log; (0, GENESIS_HASH) when it is empty."""
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
    except ValueError:
        entry = None
    if isinstance(entry, dict) and set(entry) == _LEGACY_KEYS:
        raise AuditLogError(
            f"{path} is an unkeyed audit log from an older fedllm; move it aside (check it "
            "with `fedllm audit verify FILE --legacy`) and restart to begin a keyed log"
        )
    valid = (
        isinstance(entry, dict)
        and set(entry) == _ENTRY_KEYS
        and isinstance(entry["seq"], int)
        and isinstance(entry["mac"], str)
        and hmac.compare_digest(_safe_mac(key, entry), entry["mac"])
    )
    if not valid:
        raise AuditLogError(
            f"{path}: the last entry does not verify under this audit key (wrong key, or the "
            "entry is corrupt); run `fedllm audit verify` before appending"
        )
    assert isinstance(entry, dict)
    return entry["seq"], entry["mac"]


def _safe_mac(key: bytes, entry: dict[str, Any]) -> str:
    """`entry_mac`, or "" when the entry cannot be serialised (NaN never written by us)."""
    try:
        return entry_mac(key, entry)
    except ValueError:
        return ""


@dataclass(frozen=True)
class AuditVerification:
    """Result of checking a log's chain.

    `head` is the MAC (hash, for a legacy log) of the last valid entry. Cutting entries off
    the *end* of a log leaves a valid, shorter chain, so truncation of the tail is only
    detectable against a head recorded outside the log: pass it back as ``expected_head``.
    `keyed` is False only for a legacy log checked with ``legacy=True``.
    """

    ok: bool
    entries: int
    head: str
    error: str | None = None  # "line N: reason" when not ok
    line: int | None = None
    keyed: bool = True


def verify_audit_log(
    path: Path,
    key: bytes | None = None,
    *,
    expected_head: str | None = None,
    legacy: bool = False,
) -> AuditVerification:
    """Check every entry's MAC, sequence and link to its predecessor.

    With the audit `key`, detects any edit, deletion, insertion or reordering of entries,
    including removal of the first ones, even when the rest was rewritten consistently: the
    first failure is reported with its line number. Removal of the last entries is invisible
    to the chain itself: when `expected_head` (a head recorded earlier) is given, the log must
    still contain the entry with that MAC. ``legacy=True`` checks an unkeyed pre-v2 log instead
    (no key needed; such a chain can be recomputed by anyone, so only `expected_head` anchors
    it).

    Raises:
        AuditFormatError: a legacy log without ``legacy=True``, a keyed log with it, or no key.
        OSError: the file cannot be read.
    """
    if not legacy and (key is None or len(key) < MIN_REDACTION_KEY_BYTES):
        raise AuditFormatError(
            f"a keyed audit log needs its audit key (at least {MIN_REDACTION_KEY_BYTES} bytes)"
        )
    mac_key = chain_key(key) if key is not None and not legacy else b""
    previous = GENESIS_HASH
    entries = 0
    anchored = expected_head is None
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                _check_format(raw, path, legacy)
            reason = _check_line(raw, number, previous, mac_key, legacy)
            if reason is not None:
                return AuditVerification(
                    ok=False,
                    entries=entries,
                    head=previous,
                    error=f"line {number}: {reason}",
                    line=number,
                    keyed=not legacy,
                )
            previous = json.loads(raw)["hash" if legacy else "mac"]
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
            keyed=not legacy,
        )
    return AuditVerification(ok=True, entries=entries, head=previous, keyed=not legacy)


def _check_format(raw: bytes, path: Path, legacy: bool) -> None:
    """Refuse a first line that is well-formed but of the other format than requested."""
    try:
        first = json.loads(raw)
    except ValueError:
        return
    if not isinstance(first, dict):
        return
    if not legacy and set(first) == _LEGACY_KEYS:
        raise AuditFormatError(
            f"{path} is an unkeyed (legacy) audit log: anyone can rewrite its chain, so it is "
            "not verified as keyed; check it with --legacy and a head anchored elsewhere"
        )
    if legacy and set(first) == _ENTRY_KEYS:
        raise AuditFormatError(f"{path} is a keyed audit log: verify it with its audit key")


def _check_line(raw: bytes, number: int, previous: str, mac_key: bytes, legacy: bool) -> str | None:
    """Why line `number` is not a valid successor of the entry `previous`, or None."""
    if not raw.endswith(b"\n"):
        return "incomplete last line (interrupted write or truncation)"
    try:
        entry = json.loads(raw)
    except ValueError:
        return "not a JSON object"
    if not isinstance(entry, dict):
        return "not a JSON object"
    expected = _LEGACY_KEYS if legacy else _ENTRY_KEYS
    if set(entry) != expected:
        return f"wrong keys {sorted(entry)}; expected {sorted(expected)}"
    if not legacy and entry["v"] != FORMAT_VERSION:
        return f"format version {entry['v']!r} where {FORMAT_VERSION} was expected"
    if entry["seq"] != number:
        return (
            f"sequence number {entry['seq']!r} where {number} was expected "
            "(entries deleted, inserted or reordered)"
        )
    if entry["prev"] != previous:
        return "chain broken: prev does not match the previous entry's MAC"
    if legacy:
        try:
            intact = legacy_entry_hash(entry) == entry["hash"]
        except ValueError:  # NaN or Infinity slipped in: never written by AuditLog
            intact = False
        return None if intact else "hash mismatch: the entry was modified"
    stored = entry["mac"]
    intact = isinstance(stored, str) and hmac.compare_digest(_safe_mac(mac_key, entry), stored)
    return None if intact else "MAC mismatch: the entry was modified or written without the key"
