"""AES-256-GCM encryption of files at rest, with named keys so that keys can be rotated.

Adapters, checkpoints and ledgers on a hospital's disk are patient-derived. Encrypting them at
rest means a stolen disk or backup reveals nothing without the key file, and GCM's tag means a
modified file is refused rather than loaded.

Envelope (one file or one database value)::

    b"FEDLLMENC1" | key-id length (1 byte) | key id (ASCII) | nonce (12 bytes) | ciphertext+tag

The GCM associated data is the header followed by the caller's logical name (for files, the
file name), so a file cannot be swapped for another encrypted under the same key, nor its key id
rewritten, without :class:`IntegrityError`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedllm.storage.files import write_atomic

log = structlog.get_logger(__name__)

MAGIC = b"FEDLLMENC1"
NONCE_BYTES = 12
KEY_BYTES = 32
ENCRYPTED_SUFFIX = ".enc"
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class EncryptionError(Exception):
    """A user mistake about encryption: missing or malformed key file, unknown key id."""


class IntegrityError(EncryptionError):
    """The data was modified, swapped, or is not readable with these keys; nothing is returned."""


class KeyRing:
    """Named 256-bit keys: the current one encrypts, all of them decrypt (rotation).

    Key files are JSON ``{"current": ID, "keys": {ID: base64, ...}}`` or text with one
    ``ID:base64`` per line, where the last line is the current key (``#`` starts a comment).
    Commas may replace newlines (the form an environment variable holds).
    """

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if not keys:
            raise EncryptionError("a key ring needs at least one key")
        for key_id, key in keys.items():
            _check_key_id(key_id)
            if len(key) != KEY_BYTES:
                raise EncryptionError(f"key {key_id!r} is {len(key)} bytes; expected {KEY_BYTES}")
        if current not in keys:
            raise EncryptionError(f"current key {current!r} is not in the key ring")
        self._keys = dict(keys)
        self._current = current

    @classmethod
    def generate(cls, key_id: str | None = None) -> KeyRing:
        """A ring with one fresh random key."""
        key_id = key_id or new_key_id()
        return cls({key_id: AESGCM.generate_key(bit_length=256)}, key_id)

    @classmethod
    def from_text(cls, text: str, *, source: str = "key ring") -> KeyRing:
        """Parse either key file format (see the class docstring)."""
        stripped = text.strip()
        if stripped.startswith("{"):
            return cls._from_json(stripped, source)
        keys: dict[str, bytes] = {}
        current = None
        lines = [ln for ln in stripped.splitlines() if not ln.lstrip().startswith("#")]
        for entry in re.split(r"[\s,]+", " ".join(lines)):
            if not entry:
                continue
            key_id, sep, encoded = entry.partition(":")
            if not sep:
                # The entry is not echoed: it may be a bare key pasted without its id.
                raise EncryptionError(f"{source}: expected ID:BASE64 entries")
            _check_key_id(key_id, source)
            if key_id in keys:
                raise EncryptionError(f"{source}: key {key_id!r} appears twice")
            keys[key_id] = _decode_key(encoded, key_id, source)
            current = key_id
        if current is None:
            raise EncryptionError(f"{source}: no keys")
        return cls(keys, current)

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        """Read a key file; warn when other users may read it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EncryptionError(f"no key file at {path}") from None
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("key file readable by others", path=str(path), mode=f"{mode:o}")
        return cls.from_text(text, source=str(path))

    @classmethod
    def _from_json(cls, text: str, source: str) -> KeyRing:
        try:
            data = json.loads(text)
            current = data["current"]
            encoded = data["keys"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EncryptionError(
                f'{source}: expected {{"current": ID, "keys": {{ID: BASE64}}}}'
            ) from None
        if not isinstance(encoded, dict) or not isinstance(current, str):
            raise EncryptionError(f"{source}: 'keys' must map key ids to base64 keys")
        keys = {}
        for key_id, value in encoded.items():
            _check_key_id(key_id, source)
            keys[key_id] = _decode_key(value, key_id, source)
        return cls(keys, current)

    @property
    def current_key_id(self) -> str:
        return self._current

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def key(self, key_id: str) -> bytes:
        """The key named ``key_id``; an unknown id is an :class:`IntegrityError` for readers."""
        try:
            return self._keys[key_id]
        except KeyError:
            raise IntegrityError(f"key {key_id!r} is not in the key ring") from None

    def with_new_key(self, key_id: str | None = None) -> KeyRing:
        """A ring where a fresh key is current and the old keys still decrypt."""
        key_id = key_id or new_key_id()
        if key_id in self._keys:
            raise EncryptionError(f"key {key_id!r} already exists")
        return KeyRing({**self._keys, key_id: AESGCM.generate_key(bit_length=256)}, key_id)

    def only_current(self) -> KeyRing:
        """A ring without the old keys: files still under them become unreadable."""
        return KeyRing({self._current: self._keys[self._current]}, self._current)

    def to_json(self) -> str:
        keys = {k: base64.b64encode(v).decode("ascii") for k, v in self._keys.items()}
        return json.dumps({"current": self._current, "keys": keys}, indent=2) + "\n"

    def save(self, path: Path) -> None:
        """Write the ring as JSON, mode 0600, atomically (a half-written key file loses data)."""
        write_atomic(Path(path), self.to_json().encode("utf-8"), mode=0o600)

    def __repr__(self) -> str:  # never show key material
        return f"KeyRing(current={self._current!r}, keys={self.key_ids!r})"


@dataclass(frozen=True)
class RotationResult:
    """What :func:`rotate_files` did to each file."""

    rotated: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)  # already under the current key
    skipped: list[Path] = field(default_factory=list)  # not encrypted by fedllm
    failed: list[tuple[Path, str]] = field(default_factory=list)


def new_key_id() -> str:
    """A sortable, unique key id: creation time plus random suffix."""
    return f"k{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def generate_key_file(path: Path, *, key_id: str | None = None, force: bool = False) -> KeyRing:
    """Create a key file with one fresh key; refuse to replace an existing one unless ``force``.

    Replacing a key file makes everything encrypted under it unreadable, hence the refusal.
    """
    path = Path(path)
    if path.exists() and not force:
        raise EncryptionError(f"{path} already exists; replacing it loses the keys in it")
    ring = KeyRing.generate(key_id)
    ring.save(path)
    return ring


KeyRingSource = KeyRing | Callable[[], KeyRing | None]
"""What code that encrypts is given: a fixed ring, or a callable asked at every use (`KeyFile`)."""


def current_keyring(source: KeyRingSource | None) -> KeyRing | None:
    """The ring ``source`` stands for now; ``None`` means encryption at rest is off."""
    return source() if callable(source) else source


class KeyFile:
    """A key file as a key ring source, re-read when it is replaced.

    Long-running processes (ledgers, inference servers) hold one of these instead of a parsed
    ring, so `fedllm keys rotate` takes effect without a restart. The file is parsed again only
    when its inode, mtime or size changes (a rotation writes a new file and renames it).
    """

    def __init__(self, path: Path, *, label: str | None = None) -> None:
        self._path = Path(path)
        self._label = label or str(path)
        self._loaded: tuple[tuple[int, int, int], KeyRing] | None = None

    def __call__(self) -> KeyRing:
        try:
            info = self._path.stat()
        except FileNotFoundError:
            raise EncryptionError(f"{self._label}: no key file at {self._path}") from None
        version = (info.st_ino, info.st_mtime_ns, info.st_size)
        loaded = self._loaded  # one read: another thread may replace it meanwhile
        if loaded is None or loaded[0] != version:
            loaded = (version, KeyRing.from_file(self._path))
            self._loaded = loaded
        return loaded[1]

    def __repr__(self) -> str:
        return f"KeyFile({str(self._path)!r})"


def is_encrypted(blob: bytes) -> bool:
    return blob.startswith(MAGIC)


def key_id_of(blob: bytes) -> str:
    """The id of the key that encrypted ``blob`` (read from its header, not authenticated)."""
    key_id, _ = _parse_header(blob)
    return key_id


def encrypt_bytes(data: bytes, keyring: KeyRing, *, associated_data: bytes) -> bytes:
    """Encrypt under the ring's current key; ``associated_data`` must be given again to decrypt."""
    key_id = keyring.current_key_id
    header = MAGIC + bytes([len(key_id)]) + key_id.encode("ascii")
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(keyring.key(key_id)).encrypt(nonce, data, header + associated_data)
    return header + nonce + sealed


def decrypt_bytes(blob: bytes, keyring: KeyRing, *, associated_data: bytes) -> bytes:
    """Decrypt and authenticate; any change, swap or wrong key raises :class:`IntegrityError`."""
    key_id, offset = _parse_header(blob)
    header = blob[:offset]
    nonce = blob[offset : offset + NONCE_BYTES]
    sealed = blob[offset + NONCE_BYTES :]
    if len(nonce) != NONCE_BYTES or len(sealed) < 16:
        raise IntegrityError("encrypted data is truncated")
    try:
        return AESGCM(keyring.key(key_id)).decrypt(nonce, sealed, header + associated_data)
    except InvalidTag:
        raise IntegrityError(
            f"authentication failed (modified, swapped, or not encrypted with key {key_id!r})"
        ) from None


def logical_name(path: Path) -> str:
    """The name a file's ciphertext is bound to: its file name without a trailing ``.enc``.

    A file renamed after encryption therefore needs its original name passed explicitly.
    """
    name = Path(path).name
    return name.removesuffix(ENCRYPTED_SUFFIX) if name != ENCRYPTED_SUFFIX else name


def write_encrypted(path: Path, data: bytes, keyring: KeyRing, *, name: str | None = None) -> None:
    """Encrypt ``data`` and write it atomically to ``path`` (mode 0600)."""
    path = Path(path)
    blob = encrypt_bytes(data, keyring, associated_data=_file_ad(name or logical_name(path)))
    write_atomic(path, blob, mode=0o600)


def decrypt_file(
    path: Path, keyring: KeyRing, *, name: str | None = None, contents: bytes | None = None
) -> bytes:
    """The plaintext of an encrypted file, authenticated against its logical name.

    ``contents`` are the file's bytes when the caller has already read them (one read only).
    """
    path = Path(path)
    blob = _read(path) if contents is None else contents
    if not is_encrypted(blob):
        raise IntegrityError(f"{path} is not a fedllm-encrypted file")
    try:
        return decrypt_bytes(blob, keyring, associated_data=_file_ad(name or logical_name(path)))
    except IntegrityError as err:
        raise IntegrityError(f"{path}: {err}") from None


def encrypt_file(
    path: Path, keyring: KeyRing, *, output: Path | None = None, name: str | None = None
) -> Path:
    """Encrypt a plaintext file in place (default) or into ``output``; returns the written path.

    The logical name defaults to the written file's name without ``.enc``, so ``a.pt``
    encrypted in place or into ``a.pt.enc`` decrypts with the default name ``a.pt``.
    """
    path = Path(path)
    data = _read(path)
    if is_encrypted(data):
        raise EncryptionError(f"{path} is already encrypted")
    target = Path(output) if output is not None else path
    write_encrypted(target, data, keyring, name=name)
    return target


def rotate_files(
    paths: Iterable[Path] | Path,
    keyring: KeyRing,
    *,
    name_for: Callable[[Path], str] = logical_name,
) -> RotationResult:
    """Re-encrypt every fedllm-encrypted file under ``paths`` with the ring's current key.

    Directories are walked recursively; plaintext files are skipped. Each file is replaced
    atomically, and a file that fails to decrypt is reported and left as it was, so an
    interrupted rotation can simply be run again while the old keys are still in the ring.
    """
    result = RotationResult()
    for path in _walk([paths] if isinstance(paths, Path | str) else paths):
        blob = _read(path)
        if not is_encrypted(blob):
            result.skipped.append(path)
            continue
        try:
            if key_id_of(blob) == keyring.current_key_id:
                decrypt_bytes(blob, keyring, associated_data=_file_ad(name_for(path)))
                result.unchanged.append(path)
                continue
            data = decrypt_bytes(blob, keyring, associated_data=_file_ad(name_for(path)))
        except IntegrityError as err:
            result.failed.append((path, str(err)))
            continue
        write_encrypted(path, data, keyring, name=name_for(path))
        result.rotated.append(path)
    log.info(
        "rotated encrypted files",
        key_id=keyring.current_key_id,
        rotated=len(result.rotated),
        unchanged=len(result.unchanged),
        failed=len(result.failed),
    )
    return result


class EncryptedJSON:
    """JSON values of a text column stored as AES-GCM ciphertext (base64 text), for ledgers.

    The ledger that owns the column holds one of these, built from the key ring source it was
    given, and passes every value through `dumps` before writing and `loads` after reading. A
    source giving ``None`` stores plain JSON text. The ciphertext is bound to ``name`` (use the
    table and column), so values cannot be moved to another encrypted column; values can still
    be swapped between rows of the same column, which the ledgers' own consistency checks must
    catch. ``accept_plaintext`` reads rows written before encryption was switched on
    (migration); leave it off afterwards so that an attacker cannot plant plaintext rows.
    """

    def __init__(
        self,
        keyring: KeyRingSource | None,
        *,
        name: str,
        accept_plaintext: bool = False,
    ) -> None:
        self.keyring = keyring
        self.name = name
        self.accept_plaintext = accept_plaintext

    def dumps(self, value: Any) -> str:
        """The column text for ``value``: ciphertext under the current key, or plain JSON."""
        text = json.dumps(value)
        ring = current_keyring(self.keyring)
        if ring is None:
            return text
        blob = encrypt_bytes(text.encode("utf-8"), ring, associated_data=self._ad())
        return base64.b64encode(blob).decode("ascii")

    def loads(self, value: str) -> Any:
        """The value a column text holds, authenticated; plaintext is refused under a key ring."""
        ring = current_keyring(self.keyring)
        if value.startswith(_MAGIC_B64):
            if ring is None:
                raise EncryptionError(f"column {self.name} is encrypted but no key ring is set")
            try:
                blob = base64.b64decode(value, validate=True)
            except binascii.Error:
                raise IntegrityError(f"column {self.name}: malformed ciphertext") from None
            return json.loads(decrypt_bytes(blob, ring, associated_data=self._ad()))
        if ring is not None and not self.accept_plaintext:
            raise IntegrityError(f"column {self.name}: plaintext value where ciphertext expected")
        return json.loads(value)

    def _ad(self) -> bytes:
        return b"fedllm-column:" + self.name.encode("utf-8")


_MAGIC_B64 = base64.b64encode(MAGIC)[:12].decode("ascii")  # 12 chars encode 9 whole bytes


def _parse_header(blob: bytes) -> tuple[str, int]:
    if not blob.startswith(MAGIC) or len(blob) <= len(MAGIC):
        raise IntegrityError("not fedllm-encrypted data (bad magic)")
    length = blob[len(MAGIC)]
    end = len(MAGIC) + 1 + length
    try:
        key_id = blob[len(MAGIC) + 1 : end].decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError("malformed key id in header") from None
    if len(key_id) != length or not _KEY_ID.match(key_id):
        raise IntegrityError("malformed key id in header")
    return key_id, end


def _file_ad(name: str) -> bytes:
    return b"fedllm-file:" + name.encode("utf-8")


def _check_key_id(key_id: str, source: str = "key ring") -> None:
    if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
        raise EncryptionError(
            f"{source}: key id {key_id!r} must be 1-64 letters, digits, '.', '_' or '-'"
        )


def _decode_key(encoded: object, key_id: str, source: str) -> bytes:
    try:
        key = base64.b64decode(str(encoded), validate=True)
    except binascii.Error:
        raise EncryptionError(f"{source}: key {key_id!r} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise EncryptionError(f"{source}: key {key_id!r} is {len(key)} bytes; expected 32")
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise EncryptionError(f"no file at {path}") from None
    except IsADirectoryError:
        raise EncryptionError(f"{path} is a directory") from None


def _walk(paths: Iterable[Path | str]) -> list[Path]:
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            )
        elif path.is_file():
            files.append(path)
        else:
            raise EncryptionError(f"no file or directory at {path}")
    return files
