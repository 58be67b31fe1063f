"""Adapter checkpoints on disk, encrypted at rest (AES-256-GCM) when a key ring is configured.

The server writes a per-round adapter state (``checkpoints/round-NNNN.pt``, for resuming) and
the final adapter as a peft directory (``checkpoint/``, which hospital inference servers
serve). With ``FEDLLM_ENCRYPTION_KEYS`` or ``FEDLLM_ENCRYPTION_KEY_FILE`` set, every one of
these files is written as ciphertext bound to its file name, and reading refuses a file that
was altered, swapped with another, or replaced by plaintext. Without a key ring they are plain
files, as before.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import torch
from peft import PeftModel

from fedllm.security.encryption import (
    EncryptionError,
    IntegrityError,
    KeyRing,
    decrypt_file,
    environment_keyring,
    is_encrypted,
    save_torch_encrypted,
    write_encrypted,
)

STAGING_SUFFIX = ".staging"


def read_artifact(path: Path, keyring: KeyRing | None = None) -> bytes:
    """A checkpoint file's plaintext, decrypted and authenticated when it is encrypted.

    ``keyring`` defaults to the process's environment key ring. When one is configured, a
    plaintext file is refused: otherwise anyone able to write the directory could plant an
    adapter in place of an encrypted one.
    """
    path = Path(path)
    ring = keyring if keyring is not None else environment_keyring()
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


def save_adapter_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write an adapter state dict (a round checkpoint), encrypted when a key ring is set."""
    path = Path(path)
    ring = environment_keyring()
    if ring is not None:
        save_torch_encrypted(state, path, ring)
        return
    staging = path.with_name(path.name + STAGING_SUFFIX)
    torch.save(state, staging)
    staging.replace(path)


def load_adapter_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict written by :func:`save_adapter_state` (no pickled code runs)."""
    return torch.load(io.BytesIO(read_artifact(path)), map_location="cpu", weights_only=True)


def save_adapter_directory(model: PeftModel, directory: Path) -> None:
    """Write the peft adapter directory that inference servers hot-reload.

    peft writes into a staging directory next to the target; with a key ring every file is
    then encrypted in place there; finally the files are moved into ``directory`` one rename
    each, so a server polling it never reads a half-written weights file.
    """
    directory = Path(directory)
    staging = directory.with_name(directory.name + STAGING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    ring = environment_keyring()
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    if ring is not None:
        for file in files:
            write_encrypted(file, file.read_bytes(), ring)
    directory.mkdir(parents=True, exist_ok=True)
    for file in files:
        target = directory / file.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
    shutil.rmtree(staging, ignore_errors=True)
