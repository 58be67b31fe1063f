"""Files and directories a hospital's processes create are readable by their account only.

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


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, or None for another database or an in-memory one."""
    if not url.startswith("sqlite:///"):
        return None
    database = url.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(database) if database and database != ":memory:" else None
