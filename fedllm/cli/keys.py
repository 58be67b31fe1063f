"""`fedllm keys`: encryption keys for artifacts and ledgers at rest: create, rotate, use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedllm.cli.common import console, fail
from fedllm.security.encryption import (
    ENCRYPTED_SUFFIX,
    EncryptionError,
    KeyRing,
    decrypt_file,
    encrypt_file,
    generate_key_file,
    logical_name,
    rotate_files,
)
from fedllm.security.environment import ENV_VAR, keyring_from_variable
from fedllm.storage.files import write_atomic

keys_app = typer.Typer(
    name="keys",
    help="AES-256-GCM keys for encrypting adapters, checkpoints and ledgers at rest.",
    no_args_is_help=True,
)

KeysOption = Annotated[
    Path | None,
    typer.Option("--keys", help=f"Key file (default: the {ENV_VAR} environment variable)."),
]
NameOption = Annotated[
    str | None,
    typer.Option(
        "--name", help="Logical name the ciphertext is bound to (default: the file name)."
    ),
]


@keys_app.command("generate")
def generate_command(
    out: Annotated[Path, typer.Option("--out", help="Key file to create (mode 0600).")],
    key_id: Annotated[str | None, typer.Option("--key-id", help="Name of the key.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing key file (loses its keys).")
    ] = False,
) -> None:
    """Create a key file holding one fresh 256-bit key."""
    try:
        ring = generate_key_file(out, key_id=key_id, force=force)
    except EncryptionError as err:
        fail(str(err))
    console.print(f"wrote {out} (key {ring.current_key_id}); back it up: lost keys = lost data")


@keys_app.command("list")
def list_command(keys: KeysOption = None) -> None:
    """Show the key ids in a key ring and which one is current (never the keys)."""
    ring = _load(keys)
    table = Table("key id", "current")
    for key_id in ring.key_ids:
        table.add_row(key_id, "yes" if key_id == ring.current_key_id else "")
    console.print(table)


@keys_app.command("rotate")
def rotate_command(
    directories: Annotated[
        list[Path], typer.Argument(help="Files or directories of encrypted files.")
    ],
    keys: Annotated[Path, typer.Option("--keys", help="Key file to rotate.")],
    new_key: Annotated[
        bool,
        typer.Option("--new-key/--no-new-key", help="Add a fresh current key first."),
    ] = True,
    drop_old: Annotated[
        bool,
        typer.Option(
            "--drop-old", help="Remove the old keys afterwards (only if every file rotated)."
        ),
    ] = False,
) -> None:
    """Add a new current key, re-encrypt every encrypted file under it, optionally drop old keys.

    The new key is saved before any file is re-encrypted, so an interruption never leaves a
    file under a key that is not on disk.
    """
    ring = _load(keys)
    try:
        if new_key:
            ring = ring.with_new_key()
            ring.save(keys)
        result = rotate_files(directories, ring)
    except EncryptionError as err:
        fail(str(err))
    console.print(
        f"key {ring.current_key_id}: {len(result.rotated)} re-encrypted, "
        f"{len(result.unchanged)} already current, {len(result.skipped)} not encrypted (skipped)"
    )
    for path, reason in result.failed:
        console.print(f"[bold red]failed[/] {path}: {reason}")
    if result.failed:
        if drop_old:
            console.print("old keys kept: some files are still under them")
        raise typer.Exit(1)
    if drop_old:
        ring.only_current().save(keys)
        console.print(f"dropped old keys; {keys} now holds only {ring.current_key_id}")


@keys_app.command("encrypt")
def encrypt_command(
    file: Annotated[Path, typer.Argument(help="Plaintext file.")],
    keys: KeysOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Encrypted output (default: in place).")
    ] = None,
    name: NameOption = None,
) -> None:
    """Encrypt a file under the current key (atomically; mode 0600)."""
    ring = _load(keys)
    try:
        target = encrypt_file(file, ring, output=out, name=name)
    except EncryptionError as err:
        fail(str(err))
    console.print(f"encrypted {file} -> {target} (key {ring.current_key_id})")


@keys_app.command("decrypt")
def decrypt_command(
    file: Annotated[Path, typer.Argument(help="Encrypted file.")],
    keys: KeysOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help=f"Plaintext output (default: FILE without {ENCRYPTED_SUFFIX}, else in place).",
        ),
    ] = None,
    name: NameOption = None,
) -> None:
    """Decrypt and authenticate a file; tampered files are refused, nothing is written."""
    ring = _load(keys)
    try:
        data = decrypt_file(file, ring, name=name)
    except EncryptionError as err:
        fail(str(err))
    target = out if out is not None else file.with_name(logical_name(file))
    write_atomic(target, data, mode=0o600)
    console.print(f"decrypted {file} -> {target}")


def _load(path: Path | None) -> KeyRing:
    try:
        return KeyRing.from_file(path) if path is not None else keyring_from_variable()
    except EncryptionError as err:
        fail(str(err))
