"""Supervising the long-running processes of a deployment (SuperLink, SuperNode, inference
server): start them in their own session with a log, wait for health or for the first to
exit, and turn SIGTERM into the same clean stop as Ctrl-C.

Stopping uses :func:`fedllm.federation.launcher.stop_process_tree`, which also collects the
app processes Flower starts below them.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from fedllm.federation.launcher import flower_environment


def start_process(
    command: Sequence[str], flwr_home: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    """Start a Flower process in its own session, logging to ``log_path``, with our FLWR_HOME.

    Stop it with :func:`fedllm.federation.launcher.stop_process_tree`, which also collects
    the app subprocesses it starts.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            list(command),
            env=flower_environment(flwr_home),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (systemd, ``docker stop``, ``kill``) like Ctrl-C for the block, so the
    same clean-up stops every child process whichever way the service is stopped."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_first_exit(
    processes: Mapping[str, subprocess.Popen[bytes]], poll_s: float = 0.5
) -> tuple[str, int]:
    """Block until one of the supervised processes exits; its name and exit code."""
    while True:
        for name, process in processes.items():
            code = process.poll()
            if code is not None:
                return name, code
        time.sleep(poll_s)


def log_tail(path: Path, lines: int = 15) -> str:
    """The end of a log file, for an error message that says what went wrong."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
