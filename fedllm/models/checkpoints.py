"""Adapter checkpoints on disk, encrypted at rest (AES-256-GCM) when a key ring is configured.

The server writes the global adapter after every round (``checkpoints/round-NNNN/``, for
resuming) and at the end (``checkpoint/``, which hospital inference servers serve), both as
peft adapter directories written the same way (`save_adapter_directory`). Every function here
takes the process's key ring source as ``keyring`` (its entry point reads it from the
environment; nothing here does, and leaving it out is a TypeError, never a silent plaintext
write). With a key ring, every one of these files is written as ciphertext bound to its file
name, and reading refuses a file that was altered,
swapped with another of the same name, or replaced by plaintext. Without a key ring they are
plain files that ``PeftModel.from_pretrained`` loads.

Only DP-trained adapters are published for inference servers (`publish_adapter`): the
published directory also holds ``dp-record.json`` (see fedllm.models.dp_record), encrypted like
the rest, which the servers check before serving the adapter.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load as load_safetensors

from fedllm.config.schema import ModelConfig
from fedllm.models.adapters import load_adapter_state
from fedllm.models.dp_record import (
    DP_RECORD_FILE,
    DPRecord,
    DPRecordError,
    publication_refusal,
    record_from_report,
)
from fedllm.security.encryption import (
    EncryptionError,
    IntegrityError,
    KeyRingSource,
    current_keyring,
    decrypt_file,
    is_encrypted,
    write_encrypted,
)
from fedllm.storage.files import write_atomic

STAGING_SUFFIX = ".staging"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

Sidecars = Callable[[str], Mapping[str, bytes]]


class PublicationRefusedError(DPRecordError):
    """The adapter may not be published: it was not trained with DP."""


def read_artifact(path: Path, *, keyring: KeyRingSource | None) -> bytes:
    """A checkpoint file's plaintext, decrypted and authenticated when it is encrypted.

    With a key ring, a plaintext file is refused: otherwise anyone able to write the directory
    could plant an adapter in place of an encrypted one.
    """
    path = Path(path)
    ring = current_keyring(keyring)
    data = path.read_bytes()
    if is_encrypted(data):
        if ring is None:
            raise EncryptionError(
                f"{path} is encrypted; set FEDLLM_ENCRYPTION_KEYS or FEDLLM_ENCRYPTION_KEY_FILE"
            )
        return decrypt_file(path, ring, contents=data)
    if ring is not None:
        raise IntegrityError(f"{path}: plaintext file where an encrypted one was expected")
    return data


AdapterWriter = Callable[[Mapping[str, torch.Tensor], Path], str]


def adapter_directory_writer(model: PeftModel, *, keyring: KeyRingSource | None) -> AdapterWriter:
    """A writer of adapter states as peft directories, for code that holds no PeftModel.

    The strategy only sees the global adapter as tensors; peft needs the model (its LoRA
    config) to write ``adapter_config.json``. The writer loads each state into ``model`` and
    saves it with `save_adapter_directory`, so ``model``'s adapter weights are overwritten:
    give it a model whose adapter is not otherwise in use.
    """

    def write(state: Mapping[str, torch.Tensor], directory: Path) -> str:
        load_adapter_state(model, dict(state))
        return save_adapter_directory(model, directory, keyring=keyring)

    return write


def load_round_checkpoint(path: Path, *, keyring: KeyRingSource | None) -> dict[str, torch.Tensor]:
    """The adapter state saved after a round, decrypted with ``keyring`` when it is encrypted.

    ``path`` is a peft directory (``round-NNNN/``) or, from runs before those, a
    ``round-NNNN.pt`` state dict, which is still read (tensors only: no pickled code runs).
    """
    path = Path(path)
    if path.is_dir():
        weights = path / ADAPTER_WEIGHTS[0]
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS[0]} (not a round checkpoint)")
        return load_safetensors(read_artifact(weights, keyring=keyring))
    if path.suffix == ".pt" and path.is_file():
        data = read_artifact(path, keyring=keyring)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no round checkpoint there (moved or deleted?)")


def write_artifact(path: Path, data: bytes, *, keyring: KeyRingSource | None) -> None:
    """Write one file atomically, encrypted when there is a key ring (as `read_artifact`
    expects: with a key ring, plaintext is refused)."""
    path = Path(path)
    ring = current_keyring(keyring)
    if ring is not None:
        write_encrypted(path, data, ring)
    else:
        write_atomic(path, data, mode=0o644)


def save_adapter_directory(
    model: PeftModel,
    directory: Path,
    sidecars: Sidecars | None = None,
    *,
    keyring: KeyRingSource | None,
) -> str:
    """Write the peft adapter directory that inference servers hot-reload; returns the SHA-256
    of the weights file's plaintext (what servers hash into ``model_version``).

    peft writes into a staging directory next to the target; ``sidecars`` (given that hash)
    adds files that describe those exact weights (the DP record); with a key ring every file is
    then encrypted in place there; finally the files are moved into ``directory`` one rename
    each, sidecars first, so a server polling it never reads a half-written file and never sees
    new weights before their description.
    """
    directory = Path(directory)
    staging = directory.with_name(directory.name + STAGING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        weights = next((staging / n for n in ADAPTER_WEIGHTS if (staging / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"peft wrote no {' or '.join(ADAPTER_WEIGHTS)} in {staging}")
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        extra = dict(sidecars(digest)) if sidecars is not None else {}
        for name, data in extra.items():
            (staging / name).write_bytes(data)
        _install_staged(staging, directory, first=set(extra), keyring=keyring)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return digest


def write_adapter_files(
    directory: Path,
    files: Mapping[str, bytes],
    sidecars: Collection[str],
    *,
    keyring: KeyRingSource | None,
) -> None:
    """Write an adapter directory received as plaintext files (a delivered published adapter)
    exactly as `save_adapter_directory` writes one: staged, encrypted with this machine's key
    ring when it has one, then moved in one rename per file, the ``sidecars`` (the DP
    record) first, so a server hot-reloading ``directory`` never sees weights before their
    description. ``files`` maps plain file names (no directories) to their contents.
    """
    directory = Path(directory)
    staging = directory.with_name(directory.name + STAGING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for name, data in files.items():
            if Path(name).name != name:
                raise ValueError(f"adapter file name {name!r} is not a plain file name")
            (staging / name).write_bytes(data)
        _install_staged(staging, directory, first=set(sidecars), keyring=keyring)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_adapter_files(
    directory: Path, names: Collection[str], *, keyring: KeyRingSource | None
) -> dict[str, bytes]:
    """The plaintext of the named files of an adapter directory (decrypted when encrypted)."""
    return {name: read_artifact(Path(directory) / name, keyring=keyring) for name in names}


def _install_staged(
    staging: Path, directory: Path, first: Collection[str], *, keyring: KeyRingSource | None
) -> None:
    """Encrypt the staged files in place (with a key ring), then move them into ``directory``
    one rename each, the files named in ``first`` before the others."""
    ring = current_keyring(keyring)
    files = sorted(
        (p for p in staging.rglob("*") if p.is_file()),
        key=lambda p: (p.name not in first, p),
    )
    if ring is not None:
        for file in files:
            write_encrypted(file, file.read_bytes(), ring)
    directory.mkdir(parents=True, exist_ok=True)
    for file in files:
        target = directory / file.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)


def publish_adapter(
    model: PeftModel,
    directory: Path,
    *,
    run_id: str,
    privacy: Mapping[str, Any],
    model_config: ModelConfig,
    keyring: KeyRingSource | None,
) -> DPRecord:
    """Publish a DP-trained adapter where inference servers watch, with its ``dp-record.json``.

    ``privacy`` is the run report's privacy section; ``model_config`` names the run's base
    model, whose content hash the record carries. This is the only way fedllm publishes an
    adapter, and it refuses (`PublicationRefusedError`, nothing written) a run without DP: a
    non-DP adapter in the published directory would be served as a 0 ε answer.
    """
    refusal = publication_refusal(privacy)
    if refusal is not None:
        raise PublicationRefusedError(refusal)
    written: list[DPRecord] = []

    def describe(digest: str) -> dict[str, bytes]:
        record = record_from_report(
            run_id=run_id,
            privacy=privacy,
            model=model_config,
            adapter_sha256=digest,
        )
        written.append(record)
        return {DP_RECORD_FILE: record.to_bytes()}

    save_adapter_directory(model, directory, sidecars=describe, keyring=keyring)
    return written[0]
