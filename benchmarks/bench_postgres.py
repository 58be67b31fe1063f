"""A throwaway PostgreSQL server for benchmarks, from the distribution's binaries.

It reuses the tests' server (tests/postgres_server.py: initdb in a temporary directory, trust
authentication on loopback, fsync off, run as ``nobody`` when started as root), loaded by file
path because tests/ is not a package, so benchmark and tests measure against the same setup.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

TESTS_SERVER = Path(__file__).resolve().parents[1] / "tests" / "postgres_server.py"


def _tests_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedllm_tests_postgres_server", TESTS_SERVER)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {TESTS_SERVER}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@contextmanager
def running_postgres() -> Iterator[object]:
    """A started server (``.create_database()`` gives a fresh SQLAlchemy URL); stopped after."""
    module = _tests_module()
    bin_dir = module.postgres_bin_dir()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed (no initdb on PATH or /usr/lib/postgresql)")
    directory = Path(tempfile.mkdtemp(prefix="fedllm-bench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(directory, user=module.UNPRIVILEGED_USER)
        as_user = ["runuser", "-u", module.UNPRIVILEGED_USER, "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = module.PostgresServer(bin_dir, directory, port, as_user)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
