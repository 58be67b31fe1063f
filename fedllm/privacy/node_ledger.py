"""A hospital's persistent privacy accountant: the record of every noisy release of its data.

The ledger lives at the hospital, not the server, because the guarantee is about the hospital's
records and must hold across runs, restarts and servers for the life of its dataset. It stores
events (mechanisms), and ε is always re-derived from them; the ε written next to each row is an
audit snapshot of what was reported at the time, never read back for budgeting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from numbers import Real
from typing import Any

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    func,
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedllm.privacy.accountant import (
    HOSPITAL_NEIGHBOURING,
    check_accountant,
    check_delta,
    check_neighbouring,
    compute_epsilon,
)
from fedllm.privacy.events import (
    PrivacyEvent,
    SampledGaussianSteps,
    event_from_dict,
    event_to_dict,
)
from fedllm.security.encryption import EncryptedJSON, KeyRingSource
from fedllm.storage.database import sql_engines

# Comparisons of ε against the cap allow for floating-point noise, nothing more.
CAP_TOLERANCE = 1e-9


class BudgetExceededError(RuntimeError):
    """Raised when a charge would push a hospital's ε above its cap; nothing is recorded."""

    def __init__(self, hospital_id: str, spent: float, projected: float, cap: float) -> None:
        super().__init__(
            f"privacy budget exceeded for hospital {hospital_id!r}: spent ε={spent:.6g}, "
            f"projected ε={projected:.6g} > cap ε={cap:.6g}"
        )
        self.hospital_id = hospital_id
        self.spent = spent
        self.projected = projected
        self.cap = cap


class _Base(DeclarativeBase):
    """Private metadata so the ledger's tables never mix with other modules' schemas."""


class _Hospital(_Base):
    """One row per hospital: fixes δ for the life of its dataset."""

    __tablename__ = "privacy_hospitals"

    hospital_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    delta: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _EventRow(_Base):
    """One privacy event charged to a hospital in one round of one run."""

    __tablename__ = "privacy_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hospital_id: Mapped[str] = mapped_column(
        ForeignKey("privacy_hospitals.hospital_id"), index=True
    )
    run_id: Mapped[str] = mapped_column(String(255))
    round_id: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(64))
    # JSON, AES-256-GCM encrypted when the ledger has a key ring (`EncryptedJSON`).
    event: Mapped[str] = mapped_column(Text)
    epsilon_after: Mapped[float] = mapped_column(Float)
    accountant: Mapped[str] = mapped_column(String(16))


class NodePrivacyLedger:
    """Persistent, concurrency-safe privacy accountant of one hospital.

    Any SQLAlchemy URL works; SQLite files are the default deployment. One database may hold
    several hospitals, keyed by `hospital_id`. The cap is policy and may change between
    sessions, but δ may not: ε values at different δ are not comparable, so a dataset's δ is
    fixed when its ledger is first opened. ε is accounted for replace-one neighbours (the
    hospital's dataset size is public), so the accountant must be "pld". With a ``keyring``
    (from the process's entry point, never looked up here) every event is stored AES-256-GCM
    encrypted, and a plaintext or altered row is refused.
    """

    def __init__(
        self,
        url: str,
        hospital_id: str,
        *,
        epsilon_cap: float,
        delta: float,
        accountant: str = "pld",
        keyring: KeyRingSource | None = None,
    ) -> None:
        if not isinstance(hospital_id, str) or not hospital_id:
            raise ValueError("hospital_id must be a non-empty string")
        if isinstance(epsilon_cap, bool) or not isinstance(epsilon_cap, Real):
            raise ValueError(f"epsilon_cap must be a number, got {epsilon_cap!r}")
        if not epsilon_cap > 0:
            raise ValueError(f"epsilon_cap must be > 0, got {epsilon_cap!r}")
        check_delta(delta)
        check_accountant(accountant)
        # fails now, not at the first charge, if the accountant cannot bound the relation
        check_neighbouring(accountant, HOSPITAL_NEIGHBOURING)
        self._hospital_id = hospital_id
        self._cap = float(epsilon_cap)
        self._delta = float(delta)
        self._accountant = accountant
        self._events = EncryptedJSON(keyring, name="privacy_events.event")

        self._engine, self._writer = sql_engines(url)
        _Base.metadata.create_all(self._writer)
        self._register()

    def _register(self) -> None:
        """Create this hospital's row on first use, or check its δ is unchanged."""
        try:
            with Session(self._writer) as session, session.begin():
                row = session.get(_Hospital, self._hospital_id)
                if row is None:
                    row = _Hospital(
                        hospital_id=self._hospital_id,
                        delta=self._delta,
                        created_at=datetime.now(UTC),
                    )
                    session.add(row)
                stored = row.delta
        except IntegrityError:
            # Servers without SQLite's BEGIN IMMEDIATE can let another process register the
            # hospital between our read and insert; its row is then the one to check against.
            with Session(self._engine) as session:
                stored = session.get_one(_Hospital, self._hospital_id).delta
        if not math.isclose(stored, self._delta, rel_tol=1e-12):
            raise ValueError(
                f"hospital {self._hospital_id!r} ledger uses delta={stored!r}; refusing "
                f"delta={self._delta!r} (δ must not change over a dataset's life)"
            )

    @property
    def hospital_id(self) -> str:
        """The hospital whose records this ledger protects."""
        return self._hospital_id

    @property
    def cap(self) -> float:
        """The ε this hospital's records may never exceed."""
        return self._cap

    @property
    def delta(self) -> float:
        """The fixed δ at which every ε of this ledger is reported."""
        return self._delta

    @property
    def accountant(self) -> str:
        """The accountant deriving ε from events ("pld", "rdp" or "prv")."""
        return self._accountant

    def _rows(self, session: Session) -> list[_EventRow]:
        """All of this hospital's event rows, in recorded order."""
        query = (
            select(_EventRow)
            .where(_EventRow.hospital_id == self._hospital_id)
            .order_by(_EventRow.id)
        )
        return list(session.scalars(query))

    def _epsilon(self, events: Sequence[PrivacyEvent]) -> float:
        """ε of `events` under this ledger's δ and accountant: the only way ε is obtained."""
        return compute_epsilon(events, self._delta, self._accountant)

    def events(self) -> list[PrivacyEvent]:
        """Every event charged to this hospital, in recorded order."""
        with Session(self._engine) as session:
            return [event_from_dict(self._events.loads(row.event)) for row in self._rows(session)]

    def spent_epsilon(self) -> float:
        """ε spent so far, derived from the recorded events."""
        return self._epsilon(self.events())

    def projected_epsilon(self, extra: Sequence[PrivacyEvent]) -> float:
        """ε the hospital would have spent after also running `extra`."""
        return self._epsilon([*self.events(), *extra])

    def can_afford(self, extra: Sequence[PrivacyEvent]) -> bool:
        """Whether running `extra` keeps ε within the cap (advisory; `charge` decides)."""
        return self.projected_epsilon(extra) <= self._cap + CAP_TOLERANCE

    def charge(self, extra: Sequence[PrivacyEvent], *, round_id: int, run_id: str) -> float:
        """Record `extra` for a round if the cap allows it, atomically; return the new ε.

        The check and the insert happen in one transaction holding the hospital's write lock
        (BEGIN IMMEDIATE on SQLite, SELECT ... FOR UPDATE elsewhere), so concurrent charges
        from several processes are serialised and can never overspend together.

        Raises:
            BudgetExceededError: if the projected ε exceeds the cap; nothing is recorded.
        """
        if isinstance(round_id, bool) or not isinstance(round_id, int):
            raise ValueError(f"round_id must be an integer, got {round_id!r}")
        if not isinstance(run_id, str) or not run_id:
            raise ValueError("run_id must be a non-empty string")
        payloads = [event_to_dict(e) for e in extra]
        with Session(self._writer) as session, session.begin():
            session.execute(
                select(_Hospital.hospital_id)
                .where(_Hospital.hospital_id == self._hospital_id)
                .with_for_update()
            )
            recorded = [
                event_from_dict(self._events.loads(row.event)) for row in self._rows(session)
            ]
            projected = self._epsilon([*recorded, *extra])
            if projected > self._cap + CAP_TOLERANCE:
                raise BudgetExceededError(
                    self._hospital_id, self._epsilon(recorded), projected, self._cap
                )
            now = datetime.now(UTC)
            session.add_all(
                _EventRow(
                    hospital_id=self._hospital_id,
                    run_id=run_id,
                    round_id=round_id,
                    recorded_at=now,
                    kind=payload["kind"],
                    event=self._events.dumps(payload),
                    epsilon_after=projected,
                    accountant=self._accountant,
                )
                for payload in payloads
            )
        return projected

    def rounds_participated(self) -> int:
        """Distinct (run, round) pairs in which this hospital ran DP-SGD steps."""
        pairs = (
            select(_EventRow.run_id, _EventRow.round_id)
            .where(
                _EventRow.hospital_id == self._hospital_id,
                _EventRow.kind == SampledGaussianSteps.kind,
            )
            .distinct()
            .subquery()
        )
        with Session(self._engine) as session:
            return session.scalar(select(func.count()).select_from(pairs)) or 0

    def total_steps(self) -> int:
        """DP-SGD steps ever run on this hospital's records."""
        return sum(e.steps for e in self.events() if isinstance(e, SampledGaussianSteps))

    def history(self) -> list[dict[str, Any]]:
        """Audit trail: one dict per recorded event, in order.

        Keys: run_id, round_id, recorded_at (UTC ISO 8601), event (as `event_to_dict`),
        epsilon_after (ε reported right after the charge) and the accountant that computed it.
        """
        with Session(self._engine) as session:
            return [
                {
                    "run_id": row.run_id,
                    "round_id": row.round_id,
                    "recorded_at": _as_utc(row.recorded_at).isoformat(),
                    "event": event_to_dict(event_from_dict(self._events.loads(row.event))),
                    "epsilon_after": row.epsilon_after,
                    "accountant": row.accountant,
                }
                for row in self._rows(session)
            ]


def _as_utc(moment: datetime) -> datetime:
    """SQLite drops time zones; every stored time is UTC, so restore that on the way out."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def recorded_delta(url: str, hospital_id: str) -> float | None:
    """The δ ``hospital_id``'s ledger at ``url`` was opened with; None before its first use.

    Read only (nothing is created), for tools that show a ledger without knowing the
    experiment: a ledger cannot be opened at any other δ.
    """
    engine, _ = sql_engines(url)
    try:
        if not inspect(engine).has_table(_Hospital.__tablename__):
            return None
        with Session(engine) as session:
            row = session.get(_Hospital, hospital_id)
            return None if row is None else row.delta
    finally:
        engine.dispose()
