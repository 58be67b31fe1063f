"""Which hospital each registered SuperNode key belongs to: the operator's node registry.

Flower authenticates a SuperNode by its registered public key and gives it a node id, but the
hospital name a node reports (node config ``hospital-name``, in its status reply) is its own
claim: any node with a registered key could claim any hospital's name, and with it that
hospital's place in cohorts and reports. So when the operator registers a hospital
(``fedllm superlink start`` / ``register``), the name, the key's fingerprint and the node id
Flower assigned are recorded in a JSON file owned by the operator on the SuperLink host
(``<state-dir>/node-registry.json``, 0600). ``fedllm superlink start`` passes its path to the
ServerApp in ``FEDLLM_NODE_REGISTRY``, and the ServerApp refuses every node whose claim does
not match the registry (:func:`claim_refusal`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization.ssh import SSHPublicKeyTypes

from fedllm.storage.files import write_atomic

REGISTRY_ENV = "FEDLLM_NODE_REGISTRY"
REGISTRY_FILE = "node-registry.json"


class RegistryError(Exception):
    """The registry cannot be read, or a registration would bind a key to two hospitals."""


@dataclass(frozen=True)
class RegisteredHospital:
    """One hospital: its SuperNode key's SHA-256 fingerprint and Flower's node id for it."""

    hospital: str
    key_sha256: str
    node_id: int | None


def _public_key(path: Path) -> SSHPublicKeyTypes:
    try:
        return serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise RegistryError(f"cannot read the SuperNode public key {path}: {error}") from None


def key_fingerprint(public_key: Path) -> str:
    """SHA-256 (hex) of the key's DER SubjectPublicKeyInfo, whatever file format it came in."""
    der = _public_key(public_key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def node_id_in_superlink_db(database: Path, public_key: Path) -> int | None:
    """The node id a running SuperLink holds for this key, read from its SQLite database.

    ``flwr supernode register`` names the node id only on first registration ("Public key
    already in use" afterwards); Flower's ``node`` table stores the key as PEM
    SubjectPublicKeyInfo and the node id as a signed 64-bit integer. Read-only; None when the
    database or the key's row is absent.
    """
    if not database.is_file():
        return None
    pem = _public_key(public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        row = connection.execute(
            "SELECT node_id FROM node WHERE public_key = ? AND status != 'unregistered'",
            (pem,),
        ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        connection.close()
    # Flower keeps the unsigned 64-bit node id as SQLite's signed 64-bit integer
    return int(row[0]) % (1 << 64) if row else None


class NodeRegistry:
    """The operator's registry file: hospital name ↔ key fingerprint ↔ node id, one to one."""

    def __init__(self, path: Path, entries: Mapping[str, RegisteredHospital]) -> None:
        self.path = path
        self.entries = dict(entries)

    @classmethod
    def load(cls, path: Path, *, missing_ok: bool = True) -> NodeRegistry:
        """Read the registry; an absent file is an empty registry only when ``missing_ok``."""
        if not path.is_file():
            if missing_ok:
                return cls(path, {})
            raise RegistryError(f"node registry {path} does not exist")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["hospitals"]
            entries = {
                row["hospital"]: RegisteredHospital(
                    str(row["hospital"]),
                    str(row["key_sha256"]),
                    None if row["node_id"] is None else int(row["node_id"]),
                )
                for row in rows
            }
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RegistryError(f"node registry {path} is unreadable: {error!r}") from None
        return cls(path, entries)

    def record(self, hospital: str, public_key: Path, node_id: int | None) -> RegisteredHospital:
        """Bind ``hospital`` to this key (and node id) and save; a new key replaces the old.

        Refuses a key or node id already bound to another hospital. ``node_id=None`` keeps
        the node id recorded earlier for the same key.
        """
        fingerprint = key_fingerprint(public_key)
        for other in self.entries.values():
            if other.hospital == hospital:
                continue
            if other.key_sha256 == fingerprint:
                raise RegistryError(
                    f"{public_key} is already registered as hospital {other.hospital!r}; "
                    "one key cannot belong to two hospitals"
                )
            if node_id is not None and other.node_id == node_id:
                raise RegistryError(f"node {node_id} is already hospital {other.hospital!r}")
        previous = self.entries.get(hospital)
        if node_id is None and previous is not None and previous.key_sha256 == fingerprint:
            node_id = previous.node_id
        entry = RegisteredHospital(hospital, fingerprint, node_id)
        self.entries[hospital] = entry
        self.save()
        return entry

    def save(self) -> None:
        """Write the file atomically, readable by the operator's account only (0600)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [asdict(entry) for _, entry in sorted(self.entries.items())]
        write_atomic(self.path, (json.dumps({"hospitals": rows}, indent=2) + "\n").encode())

    def hospital_of(self, node_id: int) -> str | None:
        """The hospital whose registered key Flower knows as ``node_id``."""
        for entry in self.entries.values():
            if entry.node_id == node_id:
                return entry.hospital
        return None


def claim_refusal(registry: NodeRegistry, node_id: int, claimed: str) -> str | None:
    """Why a node's claimed hospital name is refused (one line), or None when it matches."""
    registered = registry.hospital_of(node_id)
    if registered is None:
        return (
            f"node {node_id} claims hospital {claimed!r} but is not in the operator's node "
            f"registry {registry.path}; the operator registers it with `fedllm superlink register`"
        )
    if registered != claimed:
        return (
            f"node {node_id} claims hospital {claimed!r} but its registered key belongs to "
            f"{registered!r} (node registry {registry.path})"
        )
    return None


def registry_from_environment(environ: Mapping[str, str] | None = None) -> NodeRegistry | None:
    """The registry ``fedllm superlink start`` named in ``FEDLLM_NODE_REGISTRY``, if any.

    None when the variable is unset (a simulation, or a SuperLink started without fedllm);
    a named file that is missing or unreadable raises `RegistryError`, so that a broken
    registry stops the run instead of letting every claim through.
    """
    value = (os.environ if environ is None else environ).get(REGISTRY_ENV)
    if not value:
        return None
    return NodeRegistry.load(Path(value), missing_ok=False)
