"""A real PostgreSQL server for the tests that run the router and ledgers on PostgreSQL.

Loaded with ``pytest_plugins = ["postgres_server"]`` in a test module, so the session-scoped
server starts once however many modules use it. It runs from the distribution's binaries
(``initdb`` on PATH, else ``/usr/lib/postgresql/<version>/bin``) in a temporary directory, on a
free loopback port, with trust authentication for loopback only, and is stopped at the end.
initdb refuses to run as root, so as root the server runs as ``nobody`` (via ``runuser``) in a
directory that user owns. Tests skip, saying why, only when no PostgreSQL binaries exist.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

UNPRIVILEGED_USER = "nobody"
START_TIMEOUT_S = 60


def postgres_bin_dir() -> Path | None:
    """Where initdb, pg_ctl and postgres live, or None when PostgreSQL is not installed."""
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    """A running server: its port, and a way to make fresh databases on it."""

    bin_dir: Path
    data_dir: Path
    port: int
    as_user: list[str]

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of `database` on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, *args: str) -> None:
        """Run a PostgreSQL tool; its output goes to a file, never a pipe: the server that
        ``pg_ctl start`` leaves running would hold a pipe open and block the read forever."""
        with (self.data_dir / "tools.log").open("a") as output:
            subprocess.run(
                [*self.as_user, *args],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=START_TIMEOUT_S,
            )

    def start(self) -> None:
        pg_ctl = str(self.bin_dir / "pg_ctl")
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir / "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir} "
            "-c max_connections=300 -c fsync=off"
        )
        self._run(
            pg_ctl,
            "-D",
            str(self.data_dir / "data"),
            "-o",
            options,
            "-l",
            str(self.data_dir / "server.log"),
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "start",
        )

    def stop(self) -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir / "data"), "-m", "fast", "stop"
        )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole test session."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql)")
    pytest.importorskip("psycopg", reason="the psycopg driver is a dev dependency")
    directory = Path(tempfile.mkdtemp(prefix="fedllm-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(directory, user=UNPRIVILEGED_USER)
        as_user = ["runuser", "-u", UNPRIVILEGED_USER, "--"]
    server = PostgresServer(bin_dir, directory, _free_port(), as_user)
    try:
        server.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        logs = [directory / "tools.log", directory / "server.log"]
        tail = "\n".join(log.read_text()[-2000:] for log in logs if log.exists())
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start ({error}):\n{tail}") from error
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database for one test."""
    return postgres_server.create_database()


@pytest.fixture(scope="session")
def postgres_databases(postgres_server: PostgresServer) -> Callable[[], str]:
    """Makes fresh databases (for module-scoped fixtures)."""
    return postgres_server.create_database
