"""SQLAlchemy engines whose writes serialise on SQLite too, for every database fedllm keeps.

The privacy ledgers, the router's users, ε quotas and node list all open their database here.

pysqlite defers BEGIN until the first write, so a read-check-insert sequence in two processes
could both pass a budget check. Taking over transaction control (SQLAlchemy's documented
pysqlite recipe) and issuing BEGIN IMMEDIATE for writers serialises them; other databases get
the same guarantee from ``SELECT ... FOR UPDATE`` and conditional UPDATEs in the ledgers.

Several processes (router replicas, federation servers) may open one PostgreSQL database at
the same moment; `create_schema` serialises their CREATE TABLEs so none fails on the race.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event, text
from sqlalchemy.engine import make_url

# SQLite waits this long for another process's write lock before failing a write; a charge
# holds the lock while the accountant runs, which can take a few seconds for long ledgers.
SQLITE_BUSY_TIMEOUT_S = 120.0

# Execution option marking transactions that must hold SQLite's write lock from their start.
WRITE_LOCK_OPTION = "fedllm_sqlite_write_lock"

# PostgreSQL advisory lock key under which processes create tables one at a time ("fedllm").
SCHEMA_LOCK_KEY = 0x666564_6C6C6D


def sql_engines(url: str) -> tuple[Engine, Engine]:
    """A reader engine and a writer view of it whose transactions take the write lock at BEGIN."""
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S} if is_sqlite else {}
    engine = create_engine(url, connect_args=connect_args)
    if is_sqlite:
        _enable_sqlite_write_locks(engine)
    return engine, engine.execution_options(**{WRITE_LOCK_OPTION: True})


def create_schema(metadata: MetaData, writer: Engine) -> None:
    """Create `metadata`'s missing tables, safely when several processes start at once.

    ``create_all`` checks for each table and then creates it; two PostgreSQL sessions doing
    that at once both see it missing and one fails on the duplicate. A transaction-scoped
    advisory lock makes them take turns, and PostgreSQL's transactional DDL means the second
    one's check sees the first one's committed tables. SQLite's BEGIN IMMEDIATE already
    serialises the whole transaction.
    """
    with writer.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        metadata.create_all(connection)


def _enable_sqlite_write_locks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _take_over_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(WRITE_LOCK_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, or None for another database or an in-memory one."""
    if not url.startswith("sqlite:///"):
        return None
    database = url.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(database) if database and database != ":memory:" else None
