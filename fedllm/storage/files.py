"""Files written whole or not at all, and files readable by their owner only.

``write_atomic`` and ``create_exclusive`` never leave a half-written file behind, even if the
process is killed: keys, certificates, key rings and checkpoints are replaced atomically, and a
split key created by two processes at once gets one content.

The privacy ledger, the split key, the SuperNode's and inference server's logs and the state
directory say which patients' records were used, how often, and hold the hospital's secrets;
the default umask (0022) would make them world-readable. ``fedllm hospital start`` sets a
0077 umask before it creates anything, which the SuperNode, the ClientApps it starts and the
inference server inherit; the ledger file is also created 0600 explicitly, so it stays private
when a ClientApp is started some other way.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

PRIVATE_UMASK = 0o077
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def use_private_umask() -> int:
    """Make every file this process (and its children) creates private; the previous umask."""
    return os.umask(PRIVATE_UMASK)


def private_directory(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700; an existing one is left as is."""
    path = Path(path)
    if not path.exists():
        path.mkdir(parents=True, mode=PRIVATE_DIR_MODE)
        os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 (a missing directory 0700) unless it exists.

    SQLite creates its journal and WAL files with the database file's mode, so a ledger
    created this way stays readable by this account only.
    """
    path = Path(path)
    if path.exists():
        return
    private_directory(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The temporary file is created with ``mode`` already set (never briefly world-readable),
    flushed to disk, then renamed over the target; the directory is synced so that the rename
    survives a power cut.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def create_exclusive(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` (0600) only if it does not exist; False if it already did.

    The file is written and synced under a temporary name, then hard-linked into place, which
    fails if another process got there first: ``path`` never exists half-written, even if the
    process is killed, and two processes racing to create it agree on one content.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(staging, path)
    except FileExistsError:
        return False
    finally:
        staging.unlink(missing_ok=True)
    return True
