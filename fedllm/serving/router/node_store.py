"""Nodes added or removed through the admin API, persisted in the router's database.

Without this, ``POST /v1/admin/nodes`` lasted only until the router restarted, and a node could
not be taken out at all. The database (``database.url``, the same one as users and budgets)
holds the admin's changes on top of the YAML's ``nodes``: a row either registers (or replaces) a
node, or marks it removed. At start-up the router applies every row to the YAML's list, so what
an admin did survives a restart and is shared by every router on the same database.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from pydantic import ValidationError
from sqlalchemy import Boolean, DateTime, String, Text, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedllm.serving.router.config import NodeConfig
from fedllm.storage.database import create_schema, sql_engines

log = structlog.get_logger(__name__)


class NodeStoreError(Exception):
    """The node table could not be read or written."""


class _Base(DeclarativeBase):
    """Private metadata so this table never mixes with other modules' schemas."""


class _NodeChange(_Base):
    """The latest admin change to one node: its configuration, or that it was removed."""

    __tablename__ = "router_admin_nodes"

    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    config_json: Mapped[str] = mapped_column(Text)
    removed: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_by: Mapped[str] = mapped_column(String(255))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class NodeStore:
    """Admin node changes in ``url`` (SQLAlchemy); ValueError for a bad URL."""

    def __init__(self, url: str) -> None:
        try:
            make_url(url)
            self._engine, self._writer = sql_engines(url)
            create_schema(_Base.metadata, self._writer)
        except (ArgumentError, SQLAlchemyError, ImportError) as error:
            raise ValueError(f"cannot open the node table: {error}") from None

    def close(self) -> None:
        """Release pooled connections."""
        self._engine.dispose()

    def effective_nodes(self, configured: list[NodeConfig]) -> list[NodeConfig]:
        """The YAML's nodes with every stored change applied (YAML order, then added ones)."""
        nodes = {node.node_id: node for node in configured}
        try:
            with Session(self._engine) as session:
                rows = session.scalars(select(_NodeChange).order_by(_NodeChange.changed_at)).all()
        except SQLAlchemyError as error:
            raise NodeStoreError(f"cannot read the node table: {error}") from None
        for row in rows:
            if row.removed:
                nodes.pop(row.node_id, None)
            else:
                try:
                    nodes[row.node_id] = NodeConfig.model_validate_json(row.config_json)
                except ValidationError as error:
                    raise NodeStoreError(
                        f"stored node {row.node_id!r} is no longer valid: {error}"
                    ) from None
        if rows:
            log.info("admin_node_changes_applied", changes=len(rows), nodes=len(nodes))
        return list(nodes.values())

    def save(self, node: NodeConfig, admin: str) -> None:
        """Remember an added or replaced node."""
        self._write(node.node_id, node.model_dump_json(), removed=False, admin=admin)

    def remove(self, node_id: str, admin: str) -> None:
        """Remember that a node was removed (also one from the YAML)."""
        self._write(node_id, "{}", removed=True, admin=admin)

    def _write(self, node_id: str, config_json: str, *, removed: bool, admin: str) -> None:
        now = datetime.now(UTC)
        try:
            with Session(self._writer) as session, session.begin():
                row = session.get(_NodeChange, node_id)
                if row is None:
                    session.add(
                        _NodeChange(
                            node_id=node_id,
                            config_json=config_json,
                            removed=removed,
                            changed_by=admin,
                            changed_at=now,
                        )
                    )
                else:
                    row.config_json = config_json
                    row.removed = removed
                    row.changed_by = admin
                    row.changed_at = now
        except SQLAlchemyError as error:
            raise NodeStoreError(f"cannot write the node table: {error}") from None
