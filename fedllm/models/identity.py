"""The base model's one identity: a content hash of its weights, config and tokenizer files.

Everyone who touches the base model (the federation server, every hospital, every inference
server) must hold the same weights and the same tokenizer: an adapter trained on one model
and applied to another loads without complaint and answers nonsense. A name does not fix the
weights (the embedded ``tiny`` model is built locally; a directory can be edited; a hub id
moves with its revision), so the identity is the SHA-256 of the files that define the model.

It is computed once, when the model directory is built or first resolved, and stored beside
the model as ``base-model.json`` (in the directory itself when it can be written, else under
the fedllm cache). Every later load re-hashes the files and compares them with that record,
so a model changed on disk is an error that names the changed file, not a silently different
model. Within one process a verified directory is re-hashed only when a file's size or
modification time changes.

No torch here: the DP record and the CLI import this cheaply; the tiny model is built (with
torch) only when it is resolved and absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from fedllm.config.schema import ModelConfig
from fedllm.storage.files import write_atomic

log = structlog.get_logger(__name__)

BASE_MODEL_FILE = "base-model.json"
IDENTITY_FORMAT = "fedllm-base-model"
IDENTITY_VERSION = 1
TINY_MODEL_NAME = "tiny"
# The files transformers reads to build the model and its tokenizer; README, licences and
# other formats of the same weights that are not loaded do not change what is served.
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
SAFETENSORS_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
TORCH_WEIGHT_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
HASH_CHUNK = 1 << 20


class BaseModelIdentityError(RuntimeError):
    """A base model's files do not match its recorded identity, or it cannot be identified."""


@dataclass(frozen=True)
class BaseModelIdentity:
    """Which base model this is: its configured name, where it was loaded from, and its hash.

    ``revision`` is the hub commit for a Hugging Face model, else None. ``files`` maps each
    hashed file to its own SHA-256, so a mismatch can name the file that changed.
    """

    name: str
    path: str
    revision: str | None
    sha256: str
    files: dict[str, str] = field(repr=False)

    def record(self) -> dict[str, Any]:
        """The identity as a DP record and a round config carry it."""
        return {"name": self.name, "revision": self.revision, "sha256": self.sha256}


def model_files(directory: Path) -> list[Path]:
    """The files that define the model in ``directory``, sorted by name.

    When safetensors weights are present transformers loads those, so ``.bin`` copies of
    the same weights (common in hub snapshots) are not hashed.
    """
    chosen = {directory / name for name in (*CONFIG_FILES, *TOKENIZER_FILES)}
    weights = [p for pattern in SAFETENSORS_PATTERNS for p in directory.glob(pattern)]
    if not weights:
        weights = [p for pattern in TORCH_WEIGHT_PATTERNS for p in directory.glob(pattern)]
    chosen.update(weights)
    return sorted((p for p in chosen if p.is_file()), key=lambda p: p.name)


def file_sha256(path: Path) -> str:
    """SHA-256 of one file, read in chunks (weights can be many gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def combined_sha256(files: dict[str, str]) -> str:
    """One hash over every file's name and hash (order-independent of the directory listing)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def hash_model_files(directory: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the model files in ``directory``; refuses a directory without
    weights or config (it is not a model)."""
    paths = model_files(directory)
    names = {p.name for p in paths}
    if "config.json" not in names or not names - {*CONFIG_FILES, *TOKENIZER_FILES}:
        raise BaseModelIdentityError(f"{directory}: not a model directory (config.json, weights)")
    return {p.name: file_sha256(p) for p in paths}


def write_identity(
    directory: Path, name: str, revision: str | None, store: Path | None = None
) -> BaseModelIdentity:
    """Hash the model in ``directory`` and record it in ``store`` (default: beside it)."""
    files = hash_model_files(directory)
    identity = BaseModelIdentity(name, str(directory), revision, combined_sha256(files), files)
    target = store if store is not None else directory / BASE_MODEL_FILE
    payload = {
        "format": IDENTITY_FORMAT,
        "version": IDENTITY_VERSION,
        "sha256": identity.sha256,
        "revision": revision,
        "files": files,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, (json.dumps(payload, indent=2) + "\n").encode(), mode=0o644)
    return identity


def read_identity_file(store: Path) -> tuple[str, str | None, dict[str, str]]:
    """``(sha256, revision, files)`` from a ``base-model.json``; one-line error if malformed."""
    try:
        raw = json.loads(store.read_text(encoding="utf-8"))
        if raw.get("format") != IDENTITY_FORMAT:
            raise ValueError(f"format is not {IDENTITY_FORMAT!r}")
        files = {str(k): str(v) for k, v in dict(raw["files"]).items()}
        return str(raw["sha256"]), raw.get("revision"), files
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise BaseModelIdentityError(f"{store}: unreadable base-model record: {error}") from None


def verify_identity(directory: Path, name: str, store: Path) -> BaseModelIdentity:
    """Re-hash the model in ``directory`` and check it against its record in ``store``.

    Raises `BaseModelIdentityError` naming the first file that differs, is missing or is new.
    """
    sha256, revision, recorded = read_identity_file(store)
    if combined_sha256(recorded) != sha256:
        raise BaseModelIdentityError(f"{store}: the record's hash does not match its file list")
    files = hash_model_files(directory)
    for file_name in sorted(recorded.keys() | files.keys()):
        if recorded.get(file_name) != files.get(file_name):
            state = (
                "is missing"
                if file_name not in files
                else "is not in the record"
                if file_name not in recorded
                else "has changed"
            )
            raise BaseModelIdentityError(
                f"base model {name!r} at {directory}: {file_name} {state} since its hash "
                f"{sha256[:12]} was recorded in {store}"
            )
    return BaseModelIdentity(name, str(directory), revision, sha256, files)


_verified: dict[tuple[str, str], tuple[tuple[Any, ...], BaseModelIdentity]] = {}
_verified_lock = threading.Lock()


def identify(directory: Path, name: str, revision: str | None, store: Path) -> BaseModelIdentity:
    """The verified identity of the model in ``directory``, recording it first if new.

    A process that already verified these exact files (same sizes and modification times)
    does not hash them again: the hospital loads tokenizer and model separately.
    """
    key = (str(directory.resolve()), str(store))
    signature = _signature(directory, store)
    with _verified_lock:
        cached = _verified.get(key)
        if cached is not None and cached[0] == signature:
            return cached[1]
        if store.is_file():
            identity = verify_identity(directory, name, store)
        else:
            identity = write_identity(directory, name, revision, store)
            log.info("base_model.recorded", name=name, path=str(directory), sha256=identity.sha256)
        _verified[key] = (_signature(directory, store), identity)
        return identity


def resolve_base_model(config: ModelConfig) -> BaseModelIdentity:
    """Where ``config``'s base model is, verified against its recorded hash.

    ``tiny`` is built (once per tiny config) into the cache with its record; a local
    directory is identified on first use (its record written into it, or under the cache
    when the directory is read-only); a hub id must already be in the local Hugging Face
    cache (runs never download) and is identified by id, commit and content hash.
    """
    if config.name == TINY_MODEL_NAME:
        from fedllm.models.tiny import ensure_tiny_model  # torch only when building

        directory = ensure_tiny_model(config.tiny)
        return identify(directory, config.name, None, directory / BASE_MODEL_FILE)
    local = Path(config.name).expanduser()
    if local.is_dir():
        return identify(local, config.name, None, _local_store(local))
    directory, revision = _hub_snapshot(config.name)
    return identify(directory, config.name, revision, _hub_store(config.name, revision))


def _local_store(directory: Path) -> Path:
    """``DIR/base-model.json``, or a cache file when DIR has none and cannot take one."""
    beside = directory / BASE_MODEL_FILE
    if beside.is_file() or os.access(directory, os.W_OK):
        return beside
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return _store_root() / f"local-{key}.json"


def _hub_snapshot(repo_id: str) -> tuple[Path, str]:
    """The cached snapshot directory of a hub model and its commit; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise BaseModelIdentityError(
            f"model {repo_id!r} is neither 'tiny', a local directory, nor a Hugging Face model "
            f"in the local cache (download it first; nothing is downloaded here): {first}"
        ) from None
    return snapshot, snapshot.name


def _hub_store(repo_id: str, revision: str) -> Path:
    return _store_root() / f"hub--{repo_id.replace('/', '--')}--{revision}.json"


def cache_root() -> Path:
    """``$FEDLLM_CACHE_DIR``, else ``~/.cache/fedllm``: built models and identity records."""
    return Path(os.environ.get("FEDLLM_CACHE_DIR", Path.home() / ".cache" / "fedllm"))


def _store_root() -> Path:
    return cache_root() / "base-models"


def _signature(directory: Path, store: Path) -> tuple[Any, ...]:
    """(name, size, mtime_ns) of the model files and the record: cheap change detection."""
    entries = []
    for path in [*model_files(directory), store]:
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)
