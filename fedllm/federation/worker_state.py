"""The warm worker's files in a hospital's state dir: its status report and its shared secret.

Apart from :mod:`fedllm.federation.warm_worker` so that ``fedllm hospital start``, ``check`` and
``health`` name and read them without importing Flower's runtime or PyTorch. Everything lives
in ``<state_dir>/worker/`` (0700): ``status.json`` (process id, what the worker is doing and
since when, tasks run; rewritten every few seconds) and ``superexec.secret`` (0600), the
SuperExec secret that the SuperNode demands before it hands out a task.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedllm.storage.files import PRIVATE_DIR_MODE, write_atomic

# how often the worker rewrites its status file, and how old it may be before it is stale
STATUS_INTERVAL_S = 2.0
STATUS_STALE_S = 10.0


class WorkerError(RuntimeError):
    """The worker cannot start or serve as configured (one line says why)."""


def worker_dir(state_dir: Path) -> Path:
    """The worker's private directory inside the hospital's state dir."""
    return Path(state_dir) / "worker"


def worker_status_path(state_dir: Path) -> Path:
    """Where the worker reports its process id, state and task count."""
    return worker_dir(state_dir) / "status.json"


def superexec_secret_path(state_dir: Path) -> Path:
    """The secret the SuperNode and the worker share, so no other account claims tasks."""
    return worker_dir(state_dir) / "superexec.secret"


def ensure_superexec_secret(state_dir: Path) -> Path:
    """Create the shared secret (32 random bytes, 0600 in a 0700 directory) if it is missing."""
    path = superexec_secret_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    os.chmod(path.parent, PRIVATE_DIR_MODE)
    if not path.is_file():
        write_atomic(path, os.urandom(32))
    return path


@dataclass
class WorkerState:
    """What the status file says: written by a background thread, read by health checks."""

    pid: int = field(default_factory=os.getpid)
    state: str = "starting"
    since: float = field(default_factory=time.time)
    tasks: int = 0

    def enter(self, state: str) -> None:
        """Now doing ``state``."""
        self.state, self.since = state, time.time()

    def write(self, path: Path) -> None:
        """Replace the status file atomically (a reader never sees half of it)."""
        write_atomic(path, self.as_json())

    def as_json(self) -> bytes:
        """The status as the file holds it, stamped with the time of writing."""
        return json.dumps(
            {
                "pid": self.pid,
                "state": self.state,
                "since": self.since,
                "tasks": self.tasks,
                "updated": time.time(),
            }
        ).encode()


def read_status(state_dir: Path) -> dict | None:
    """The worker's last status, or None when it never wrote one."""
    try:
        return json.loads(worker_status_path(state_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
