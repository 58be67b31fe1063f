"""Per-user and per-department ε quotas at the router, reserved before and settled after use.

These quotas sit *on top of* the hospitals' global guarantee (each hospital's node ledger caps
the ε its records can ever lose); they ration that shared guarantee among the people asking.
A consensus answer's ε is reserved against both the user's and the department's quota before
any hospital is asked, committed once the answer is delivered and refunded if it was not.

Design choices, each for a failure mode:

- **Integer micro-ε.** Amounts are stored as whole millionths of ε, costs rounded up and quotas
  rounded down, so ten reservations of 0.1 fill a quota of 1.0 exactly and float drift can
  never let an eleventh through.
- **Atomic reservation.** One transaction runs a conditional
  ``UPDATE ... SET reserved = reserved + c WHERE spent + reserved + c <= quota`` on the user's
  row and then the department's; if either matches no row, both are rolled back. The database
  serialises concurrent routers (SQLite: BEGIN IMMEDIATE; PostgreSQL: the row lock the UPDATE
  takes and its re-check of the WHERE clause), so quotas hold across threads and processes.
- **Fail safe.** A reservation left "reserved" by a crashed router keeps counting against the
  quota; every database error raises :class:`LedgerUnavailableError` so callers fail closed.
- **Refresh periods.** Usage is kept per period, ``floor(unix_time / period_s)``; a new period
  starts at zero without any reset job. A reservation settles in the period it was made in.
- **History.** Every settlement (charge or refund) is appended to ``budget_events`` in the same
  transaction that moves the ε, so the history can never disagree with the usage rows; it is
  what the history, department-usage and unusual-spending queries read.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from numbers import Real
from typing import Literal

import structlog
from sqlalchemy import BigInteger, DateTime, Integer, String, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedllm.storage.database import create_schema, sql_engines

log = structlog.get_logger(__name__)

Scope = Literal["user", "department"]

# Amounts are stored as integer multiples of this many ε.
MICRO = Decimal("0.000001")

STATE_RESERVED = "reserved"
STATE_COMMITTED = "committed"
STATE_REFUNDED = "refunded"

# What a reservation pays for unless the caller says otherwise (the only charged mechanism today).
DEFAULT_MECHANISM = "gnmax-consensus"
EVENT_CHARGE = "charge"
EVENT_REFUND = "refund"
MAX_HISTORY_PAGE = 500


class QuotaExceededError(Exception):
    """A reservation would exceed the user's or the department's quota; nothing was reserved."""

    def __init__(
        self, scope: Scope, name: str, requested: float, remaining: float, period_end: datetime
    ) -> None:
        super().__init__(
            f"{scope} {name!r} privacy quota exceeded: requested ε={requested:.6g}, remaining "
            f"ε={remaining:.6g} until {period_end.isoformat()}"
        )
        self.scope = scope
        self.name = name
        self.requested = requested
        self.remaining = remaining
        self.period_end = period_end


class LedgerUnavailableError(Exception):
    """The budget database could not be read or written; callers must refuse (HTTP 503)."""


@dataclass(frozen=True)
class Reservation:
    """ε held against a user's and a department's quota until committed or refunded."""

    id: str
    user_id: str
    department: str
    epsilon: float
    mechanism: str = DEFAULT_MECHANISM


@dataclass(frozen=True)
class BudgetEvent:
    """One settlement in a user's history: ε charged or refunded for one request."""

    id: int
    kind: str  # EVENT_CHARGE or EVENT_REFUND
    user_id: str
    department: str
    epsilon: float
    mechanism: str
    request_id: str  # the reservation id, also in the request's audit entry
    at: datetime


@dataclass(frozen=True)
class UserUsage:
    """A user's quota use in the current period, as a fraction of the quota in force."""

    user_id: str
    quota: float
    used: float  # spent + reserved
    fraction: float  # used / quota; 1.0 for a zero quota


@dataclass(frozen=True)
class DepartmentUsage:
    """ε charged and refunded for one department's users over a time range."""

    department: str
    charged: float
    charges: int
    refunded: float
    refunds: int
    users: int


@dataclass(frozen=True)
class BudgetStatus:
    """A user's quota in the current period (``remaining`` counts open reservations as used)."""

    user_id: str
    quota: float
    spent: float
    reserved: float
    remaining: float
    period_end: datetime
    department: str
    department_remaining: float


class _Base(DeclarativeBase):
    """Private metadata so the budget tables never mix with other modules' schemas."""


class _Usage(_Base):
    """ε spent and reserved by one user or department in one refresh period."""

    __tablename__ = "budget_usage"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    period: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    spent_micro: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_micro: Mapped[int] = mapped_column(BigInteger, default=0)


class _Quota(_Base):
    """A quota set at runtime (admin API) for one user or department; wins over configuration."""

    __tablename__ = "budget_quotas"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    quota_micro: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _ReservationRow(_Base):
    """One reservation and its settlement, kept for audit."""

    __tablename__ = "budget_reservations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255), index=True)
    department: Mapped[str] = mapped_column(String(255))
    period: Mapped[int] = mapped_column(BigInteger)
    amount_micro: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class _EventRow(_Base):
    """One settlement, appended in the transaction that moves the ε (a table of its own, so
    databases created before it need no migration: ``create_all`` adds it)."""

    __tablename__ = "budget_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reservation_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[str] = mapped_column(String(255), index=True)
    department: Mapped[str] = mapped_column(String(255), index=True)
    amount_micro: Mapped[int] = mapped_column(BigInteger)
    mechanism: Mapped[str] = mapped_column(String(64))
    # Unix time in microseconds: exact, and compared the same way by every database.
    at_us: Mapped[int] = mapped_column(BigInteger, index=True)


def _to_us(moment: datetime) -> int:
    """An aware datetime as Unix microseconds."""
    return int(moment.timestamp() * 1_000_000)


def _check_amount(name: str, value: object, *, allow_zero: bool) -> Decimal:
    """`value` as an exact decimal, rejecting non-numbers, non-finite and negative values."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    # str() is the shortest decimal that round-trips, so 0.1 becomes exactly 0.1, not 0.1000…05.
    return Decimal(str(float(value)))


def _cost_micro(epsilon: float) -> int:
    """A cost in micro-ε, rounded up: never charge less than was spent."""
    amount = _check_amount("epsilon", epsilon, allow_zero=False)
    return int((amount / MICRO).to_integral_value(rounding=ROUND_CEILING))


def _quota_micro(epsilon: float) -> int:
    """A quota in micro-ε, rounded down: never allow more than was granted."""
    amount = _check_amount("quota", epsilon, allow_zero=True)
    return int((amount / MICRO).to_integral_value(rounding=ROUND_FLOOR))


def _epsilon(micro: int) -> float:
    """Micro-ε back to ε for reporting."""
    return float(Decimal(micro) * MICRO)


def _check_name(kind: str, value: object) -> str:
    """Reject empty or oversized user and department names before they reach the database."""
    if not isinstance(value, str) or not value or len(value) > 255:
        raise ValueError(f"{kind} must be a non-empty string of at most 255 characters")
    return value


class BudgetLedger:
    """Persistent ε quotas per user and per department, shared by every router process.

    ``url`` is any SQLAlchemy URL (SQLite file by default, PostgreSQL for several router
    hosts). ``user_quota`` and ``department_quota`` are the defaults per period of
    ``period_s`` seconds; ``quota_overrides`` maps user ids to configured quotas. Quotas set
    with :meth:`set_user_quota` / :meth:`set_department_quota` are stored in the database, win
    over both, and are re-read on every reservation, so they apply to all routers at once and
    survive restarts. ``clock`` (Unix seconds) exists for tests of period rollover.
    """

    def __init__(
        self,
        url: str,
        *,
        user_quota: float,
        department_quota: float,
        period_s: float,
        quota_overrides: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._user_quota = _quota_micro(user_quota)
        self._department_quota = _quota_micro(department_quota)
        if (
            isinstance(period_s, bool)
            or not isinstance(period_s, Real)
            or not math.isfinite(period_s)
            or period_s <= 0
        ):
            raise ValueError(f"period_s must be a finite number > 0, got {period_s!r}")
        self._period_s = float(period_s)
        self._overrides = {
            _check_name("user_id", user): _quota_micro(quota)
            for user, quota in (quota_overrides or {}).items()
        }
        self._clock = clock
        try:
            make_url(url)
            self._engine, self._writer = sql_engines(url)
        except (ArgumentError, SQLAlchemyError, ImportError) as error:
            raise ValueError(f"invalid budget database URL: {error}") from error
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        try:
            self._ensure_schema()
        except LedgerUnavailableError as error:
            # Starting anyway lets the router answer 503 (fail closed) until the database is
            # back, instead of refusing to start; every operation retries the schema first.
            log.warning("budget database unavailable at start-up", error=str(error))

    def close(self) -> None:
        """Release pooled database connections."""
        self._engine.dispose()

    @property
    def period_s(self) -> float:
        """Length of a refresh period in seconds."""
        return self._period_s

    def _ensure_schema(self) -> None:
        """Create the tables once per process (idempotent in the database too)."""
        if self._schema_ready:
            return
        with self._schema_lock, self._unavailable_on_error():
            if not self._schema_ready:
                create_schema(_Base.metadata, self._writer)
                self._schema_ready = True

    @contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        """Turn every database failure into LedgerUnavailableError so callers fail closed."""
        try:
            yield
        except SQLAlchemyError as error:
            log.error("budget database error", error=str(error))
            raise LedgerUnavailableError(f"budget database unavailable: {error}") from error

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """A write transaction holding the database's write lock from its start."""
        self._ensure_schema()
        with self._unavailable_on_error(), Session(self._writer) as session, session.begin():
            yield session

    def _period(self) -> int:
        """Index of the current refresh period."""
        return math.floor(self._clock() / self._period_s)

    def _period_end(self, period: int) -> datetime:
        """When `period` ends and a fresh quota starts."""
        return datetime.fromtimestamp((period + 1) * self._period_s, tz=UTC)

    def _quota(self, session: Session, scope: Scope, name: str) -> int:
        """The quota in force: a database override, else configuration, else the default."""
        stored = session.get(_Quota, (scope, name))
        if stored is not None:
            return stored.quota_micro
        if scope == "user":
            return self._overrides.get(name, self._user_quota)
        return self._department_quota

    def _ensure_usage(self, session: Session, scope: Scope, name: str, period: int) -> None:
        """Create the (scope, name, period) usage row if it does not exist yet.

        Under SQLite's BEGIN IMMEDIATE nobody else can insert it meanwhile; on other databases a
        concurrent router may, and the savepoint turns that race into "it exists now".
        """
        if session.get(_Usage, (scope, name, period)) is not None:
            return
        try:
            with session.begin_nested():
                session.add(
                    _Usage(scope=scope, name=name, period=period, spent_micro=0, reserved_micro=0)
                )
        except IntegrityError:
            log.debug("usage row created concurrently", scope=scope, name=name, period=period)

    def _hold(self, session: Session, scope: Scope, name: str, period: int, cost: int) -> None:
        """Add `cost` to the row's reservations if the quota allows it, else raise."""
        quota = self._quota(session, scope, name)
        self._ensure_usage(session, scope, name, period)
        result = session.execute(
            update(_Usage)
            .where(
                _Usage.scope == scope,
                _Usage.name == name,
                _Usage.period == period,
                _Usage.spent_micro + _Usage.reserved_micro + cost <= quota,
            )
            .values(reserved_micro=_Usage.reserved_micro + cost)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            row = session.get_one(_Usage, (scope, name, period), populate_existing=True)
            remaining = max(0, quota - row.spent_micro - row.reserved_micro)
            raise QuotaExceededError(
                scope, name, _epsilon(cost), _epsilon(remaining), self._period_end(period)
            )

    def reserve(
        self,
        user_id: str,
        department: str,
        epsilon: float,
        mechanism: str = DEFAULT_MECHANISM,
    ) -> Reservation:
        """Hold `epsilon` against both the user's and the department's quota, atomically.

        `mechanism` names what the ε pays for; it is recorded with the settlement.

        Raises:
            QuotaExceededError: if either quota would be exceeded; nothing is held.
            LedgerUnavailableError: if the database fails; nothing is held.
        """
        _check_name("user_id", user_id)
        _check_name("department", department)
        cost = _cost_micro(epsilon)
        period = self._period()
        reservation_id = str(uuid.uuid4())
        with self._transaction() as session:
            self._hold(session, "user", user_id, period, cost)
            self._hold(session, "department", department, period, cost)
            session.add(
                _ReservationRow(
                    id=reservation_id,
                    user_id=user_id,
                    department=department,
                    period=period,
                    amount_micro=cost,
                    state=STATE_RESERVED,
                    created_at=datetime.now(UTC),
                )
            )
        log.debug(
            "budget reserved",
            reservation=reservation_id,
            user=user_id,
            department=department,
            epsilon=_epsilon(cost),
        )
        return Reservation(reservation_id, user_id, department, _epsilon(cost), mechanism)

    def _settle(self, reservation: Reservation, target: str) -> str:
        """Move a reservation from "reserved" to `target` once; return its state afterwards.

        The state change is a conditional UPDATE, so of two concurrent settlements of the same
        reservation exactly one moves the ε; the other sees the new state and does nothing.
        """
        with self._transaction() as session:
            moved = session.execute(
                update(_ReservationRow)
                .where(
                    _ReservationRow.id == reservation.id,
                    _ReservationRow.state == STATE_RESERVED,
                )
                .values(state=target, settled_at=datetime.now(UTC))
                .execution_options(synchronize_session=False)
            )
            row = session.get(_ReservationRow, reservation.id, populate_existing=True)
            if row is None:
                raise ValueError(f"unknown reservation {reservation.id!r}")
            if moved.rowcount != 1:
                return row.state
            spent = row.amount_micro if target == STATE_COMMITTED else 0
            session.add(
                _EventRow(
                    reservation_id=row.id,
                    kind=EVENT_CHARGE if target == STATE_COMMITTED else EVENT_REFUND,
                    user_id=row.user_id,
                    department=row.department,
                    amount_micro=row.amount_micro,
                    mechanism=reservation.mechanism,
                    at_us=int(self._clock() * 1_000_000),
                )
            )
            for scope, name in (("user", row.user_id), ("department", row.department)):
                session.execute(
                    update(_Usage)
                    .where(
                        _Usage.scope == scope,
                        _Usage.name == name,
                        _Usage.period == row.period,
                    )
                    .values(
                        reserved_micro=_Usage.reserved_micro - row.amount_micro,
                        spent_micro=_Usage.spent_micro + spent,
                    )
                    .execution_options(synchronize_session=False)
                )
            return target

    def commit(self, reservation: Reservation) -> None:
        """Turn a reservation into spent ε. Repeating it is a no-op.

        Raises:
            ValueError: if the reservation is unknown or was already refunded (its ε was
                released, so counting it now would be a bookkeeping bug, not a spend).
        """
        state = self._settle(reservation, STATE_COMMITTED)
        if state == STATE_REFUNDED:
            raise ValueError(f"reservation {reservation.id!r} was already refunded")
        log.debug("budget committed", reservation=reservation.id)

    def refund(self, reservation: Reservation) -> None:
        """Release a reservation's ε. Repeating it, or refunding a committed one, is a no-op.

        A committed reservation stays spent: refusing to un-spend is the fail-safe direction.

        Raises:
            ValueError: if the reservation is unknown.
        """
        state = self._settle(reservation, STATE_REFUNDED)
        if state == STATE_COMMITTED:
            log.warning("refund of a committed reservation ignored", reservation=reservation.id)
        else:
            log.debug("budget refunded", reservation=reservation.id)

    def status(self, user_id: str, department: str) -> BudgetStatus:
        """The user's and department's quota use in the current period."""
        _check_name("user_id", user_id)
        _check_name("department", department)
        period = self._period()
        self._ensure_schema()
        with self._unavailable_on_error(), Session(self._engine) as session:
            quota = self._quota(session, "user", user_id)
            user = session.get(_Usage, ("user", user_id, period))
            dept_quota = self._quota(session, "department", department)
            dept = session.get(_Usage, ("department", department, period))
            spent = user.spent_micro if user is not None else 0
            reserved = user.reserved_micro if user is not None else 0
            dept_used = dept.spent_micro + dept.reserved_micro if dept is not None else 0
        return BudgetStatus(
            user_id=user_id,
            quota=_epsilon(quota),
            spent=_epsilon(spent),
            reserved=_epsilon(reserved),
            remaining=_epsilon(max(0, quota - spent - reserved)),
            period_end=self._period_end(period),
            department=department,
            department_remaining=_epsilon(max(0, dept_quota - dept_used)),
        )

    def _set_quota(self, scope: Scope, name: str, epsilon: float) -> None:
        """Persist a quota override; it applies from the next reservation on, in every router."""
        micro = _quota_micro(epsilon)
        with self._transaction() as session:
            row = session.get(_Quota, (scope, name))
            now = datetime.now(UTC)
            if row is None:
                session.add(_Quota(scope=scope, name=name, quota_micro=micro, updated_at=now))
            else:
                row.quota_micro = micro
                row.updated_at = now
        log.info("budget quota set", scope=scope, name=name, epsilon=_epsilon(micro))

    def set_quotas(self, users: Mapping[str, float], departments: Mapping[str, float]) -> None:
        """Set several quotas all or nothing: every name and amount is checked, then all are
        written in one transaction (a failure leaves every quota as it was)."""
        rows = [
            ("user", _check_name("user_id", name), _quota_micro(q)) for name, q in users.items()
        ]
        rows += [
            ("department", _check_name("department", name), _quota_micro(q))
            for name, q in departments.items()
        ]
        if not rows:
            return
        now = datetime.now(UTC)
        with self._transaction() as session:
            for scope, name, micro in rows:
                row = session.get(_Quota, (scope, name))
                if row is None:
                    session.add(_Quota(scope=scope, name=name, quota_micro=micro, updated_at=now))
                else:
                    row.quota_micro = micro
                    row.updated_at = now
        log.info("budget quotas set", count=len(rows))

    def set_user_quota(self, user_id: str, epsilon: float) -> None:
        """Set a user's ε quota per period (overrides configuration, persisted)."""
        self._set_quota("user", _check_name("user_id", user_id), epsilon)

    def set_department_quota(self, department: str, epsilon: float) -> None:
        """Set a department's ε quota per period (overrides configuration, persisted)."""
        self._set_quota("department", _check_name("department", department), epsilon)

    def history(
        self, user_id: str, *, limit: int = 100, before: int | None = None
    ) -> tuple[list[BudgetEvent], int | None]:
        """A user's charges and refunds, newest first, one page at a time.

        `before` is the cursor returned with the previous page (an event id); the second value
        returned is the cursor of the next page, or None after the last one. Keyset paging, so
        events settled meanwhile never shift or repeat a page.
        """
        _check_name("user_id", user_id)
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= MAX_HISTORY_PAGE
        ):
            raise ValueError(
                f"limit must be an integer from 1 to {MAX_HISTORY_PAGE}, got {limit!r}"
            )
        query = select(_EventRow).where(_EventRow.user_id == user_id)
        if before is not None:
            query = query.where(_EventRow.id < before)
        query = query.order_by(_EventRow.id.desc()).limit(limit + 1)
        self._ensure_schema()
        with self._unavailable_on_error(), Session(self._engine) as session:
            rows = list(session.scalars(query))
        page = [_event(row) for row in rows[:limit]]
        return page, (page[-1].id if len(rows) > limit else None)

    def users_above(self, fraction: float) -> list[UserUsage]:
        """Users whose use this period (spent + reserved) is above `fraction` of their quota,
        highest first. Users with no use this period are never listed."""
        threshold = float(_check_amount("fraction", fraction, allow_zero=True))
        period = self._period()
        self._ensure_schema()
        with self._unavailable_on_error(), Session(self._engine) as session:
            rows = session.scalars(
                select(_Usage).where(_Usage.scope == "user", _Usage.period == period)
            ).all()
            usages = []
            for row in rows:
                quota = self._quota(session, "user", row.name)
                used = row.spent_micro + row.reserved_micro
                share = used / quota if quota > 0 else 1.0
                if used > 0 and share > threshold:
                    usages.append(UserUsage(row.name, _epsilon(quota), _epsilon(used), share))
        return sorted(usages, key=lambda usage: (-usage.fraction, usage.user_id))

    def department_usage(self, since: datetime, until: datetime) -> list[DepartmentUsage]:
        """ε charged and refunded per department for settlements in [since, until)."""
        if until <= since:
            raise ValueError("until must be after since")
        query = (
            select(
                _EventRow.department,
                _EventRow.kind,
                func.sum(_EventRow.amount_micro),
                func.count(_EventRow.id),
            )
            .where(_EventRow.at_us >= _to_us(since), _EventRow.at_us < _to_us(until))
            .group_by(_EventRow.department, _EventRow.kind)
        )
        users_query = (
            select(_EventRow.department, func.count(func.distinct(_EventRow.user_id)))
            .where(_EventRow.at_us >= _to_us(since), _EventRow.at_us < _to_us(until))
            .group_by(_EventRow.department)
        )
        self._ensure_schema()
        with self._unavailable_on_error(), Session(self._engine) as session:
            sums = session.execute(query).all()
            users = dict(session.execute(users_query).all())
        totals: dict[str, dict[str, tuple[int, int]]] = {}
        for department, kind, micro, count in sums:
            totals.setdefault(department, {})[kind] = (int(micro), int(count))
        return [
            DepartmentUsage(
                department=department,
                charged=_epsilon(kinds.get(EVENT_CHARGE, (0, 0))[0]),
                charges=kinds.get(EVENT_CHARGE, (0, 0))[1],
                refunded=_epsilon(kinds.get(EVENT_REFUND, (0, 0))[0]),
                refunds=kinds.get(EVENT_REFUND, (0, 0))[1],
                users=int(users.get(department, 0)),
            )
            for department, kinds in sorted(totals.items())
        ]

    def charged_by_user(self, since_s: float, until_s: float) -> dict[str, float]:
        """ε charged per user for settlements in [since_s, until_s) (Unix seconds)."""
        query = (
            select(_EventRow.user_id, func.sum(_EventRow.amount_micro))
            .where(
                _EventRow.kind == EVENT_CHARGE,
                _EventRow.at_us >= int(since_s * 1_000_000),
                _EventRow.at_us < int(until_s * 1_000_000),
            )
            .group_by(_EventRow.user_id)
        )
        self._ensure_schema()
        with self._unavailable_on_error(), Session(self._engine) as session:
            return {user: _epsilon(int(micro)) for user, micro in session.execute(query).all()}


def _event(row: _EventRow) -> BudgetEvent:
    return BudgetEvent(
        id=row.id,
        kind=row.kind,
        user_id=row.user_id,
        department=row.department,
        epsilon=_epsilon(row.amount_micro),
        mechanism=row.mechanism,
        request_id=row.reservation_id,
        at=datetime.fromtimestamp(row.at_us / 1_000_000, tz=UTC),
    )
