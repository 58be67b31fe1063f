"""The user store: who may use the serving API, in which role and department.

Users live in a SQL database (SQLite by default) so that the router's replicas and the
``fedllm users`` CLI share one source of truth. Failed-login counters and lockouts are stored
with the user, not in memory, so restarting the router cannot reset an attacker's guess count.
Writes go through `fedllm.storage.database.sql_engines`, whose SQLite transactions take the
write lock at BEGIN, so two processes counting failures for one user never lose an increment.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache

import structlog
from sqlalchemy import DateTime, Float, Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedllm.security.passwords import hash_password, needs_rehash, verify_password
from fedllm.storage.database import create_schema, sql_engines

logger = structlog.get_logger(__name__)

USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
DEPARTMENT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# NIST SP 800-63B: at least 8 characters; the upper bound only stops absurd inputs.
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024

# One message for unknown users and wrong passwords, so a login cannot probe which users exist.
AUTHENTICATION_FAILED = "invalid username or password"


class Role(StrEnum):
    """What a user may do: clinicians and researchers query, admins also manage the service."""

    CLINICIAN = "clinician"
    RESEARCHER = "researcher"
    ADMIN = "admin"


@dataclass(frozen=True)
class User:
    """An authenticated identity, without its secrets."""

    username: str
    role: Role
    department: str


@dataclass(frozen=True)
class AccountStatus:
    """A user with the state of its login protection, for operators."""

    user: User
    failed_logins: int
    locked_until: float | None  # Unix time; None when not locked


class AuthenticationError(Exception):
    """Wrong username or password; the message never says which."""


class UnknownUserError(AuthenticationError):
    """No account has that name. Same message as a wrong password (callers must not reveal
    which); a distinct type so the audit log can keep only a digest of the typed name, which
    may be a password entered in the wrong field."""


class AccountLockedError(AuthenticationError):
    """Too many consecutive failed logins; the account accepts none until the lockout ends."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(
            f"account locked after too many failed logins; retry in {math.ceil(retry_after_s)} s"
        )
        self.retry_after_s = retry_after_s


class _Base(DeclarativeBase):
    """Private metadata so the user table never mixes with other modules' schemas."""


class _UserRow(_Base):
    __tablename__ = "auth_users"

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(32))
    department: Mapped[str] = mapped_column(String(64))
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    def to_user(self) -> User:
        return User(username=self.username, role=Role(self.role), department=self.department)


def validate_username(username: object) -> str:
    """`username` if it is 1-64 characters of letters, digits and ``_ . @ -``."""
    if not isinstance(username, str) or not USERNAME_PATTERN.fullmatch(username):
        raise ValueError(
            f"invalid username {username!r}: expected 1-64 characters of letters, digits "
            "and _ . @ -"
        )
    return username


def validate_department(department: object) -> str:
    """`department` if it is 1-64 characters of letters, digits and ``_ . -``."""
    if not isinstance(department, str) or not DEPARTMENT_PATTERN.fullmatch(department):
        raise ValueError(
            f"invalid department {department!r}: expected 1-64 characters of letters, "
            "digits and _ . -"
        )
    return department


def validate_role(role: object) -> Role:
    """`role` as a `Role`, accepting its string value."""
    try:
        return Role(role)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise ValueError(f"invalid role {role!r}: expected one of {choices}") from None


def validate_password(password: object) -> str:
    """`password` if its length is within the policy's bounds."""
    if not isinstance(password, str):
        raise ValueError("password must be a string")
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise ValueError(
            f"password must be {MIN_PASSWORD_LENGTH}-{MAX_PASSWORD_LENGTH} characters long"
        )
    return password


@cache
def _decoy_hash() -> str:
    """A hash to verify against for unknown users, so they cost as much time as known ones."""
    return hash_password("decoy password that no account has")


class UserStore:
    """Users, password hashes, roles, departments and persisted login lockouts.

    After `max_failed_logins` consecutive failures an account refuses every login, right or
    wrong, for `lockout_s` seconds; a success resets the count. `clock` (Unix seconds) is
    injectable so lockout expiry can be tested without sleeping.
    """

    def __init__(
        self,
        url: str,
        *,
        max_failed_logins: int = 5,
        lockout_s: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(max_failed_logins, bool) or not isinstance(max_failed_logins, int):
            raise ValueError(f"max_failed_logins must be an integer, got {max_failed_logins!r}")
        if max_failed_logins < 1:
            raise ValueError(f"max_failed_logins must be >= 1, got {max_failed_logins}")
        if not (isinstance(lockout_s, int | float) and math.isfinite(lockout_s) and lockout_s > 0):
            raise ValueError(f"lockout_s must be a finite number > 0, got {lockout_s!r}")
        self._max_failed = max_failed_logins
        self._lockout_s = float(lockout_s)
        self._clock = clock
        self._engine, self._writer = sql_engines(url)
        create_schema(_Base.metadata, self._writer)

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()

    def add_user(self, username: str, password: str, role: Role | str, department: str) -> User:
        """Create a user; ValueError if the username is taken or any value is invalid."""
        validate_username(username)
        validate_password(password)
        validate_department(department)
        user = User(username=username, role=validate_role(role), department=department)
        row = _UserRow(
            username=username,
            password_hash=hash_password(password),
            role=user.role.value,
            department=department,
            failed_logins=0,
            locked_until=None,
            created_at=datetime.now(UTC),
        )
        try:
            with Session(self._writer) as session, session.begin():
                if session.get(_UserRow, username) is not None:
                    raise ValueError(f"user {username!r} already exists")
                session.add(row)
        except IntegrityError:
            raise ValueError(f"user {username!r} already exists") from None
        logger.info("user added", username=username, role=user.role.value, department=department)
        return user

    def remove_user(self, username: str) -> None:
        """Delete a user; ValueError if there is none of that name."""
        with Session(self._writer) as session, session.begin():
            row = session.get(_UserRow, username)
            if row is None:
                raise ValueError(f"no user named {username!r}")
            session.delete(row)
        logger.info("user removed", username=username)

    def unlock(self, username: str) -> None:
        """Lift a lockout and reset the failure count; ValueError if there is no such user."""
        with Session(self._writer) as session, session.begin():
            row = session.get(_UserRow, username)
            if row is None:
                raise ValueError(f"no user named {username!r}")
            row.failed_logins = 0
            row.locked_until = None
        logger.info("user unlocked", username=username)

    def get(self, username: str) -> User | None:
        """The user of that name, or None."""
        if not isinstance(username, str) or not USERNAME_PATTERN.fullmatch(username):
            return None
        with Session(self._engine) as session:
            row = session.get(_UserRow, username)
            return None if row is None else row.to_user()

    def accounts(self) -> list[AccountStatus]:
        """Every user with its failure count and lockout end (None once it has passed)."""
        now = self._clock()
        with Session(self._engine) as session:
            rows = session.scalars(select(_UserRow).order_by(_UserRow.username))
            return [
                AccountStatus(
                    user=row.to_user(),
                    failed_logins=row.failed_logins,
                    locked_until=(
                        row.locked_until
                        if row.locked_until is not None and row.locked_until > now
                        else None
                    ),
                )
                for row in rows
            ]

    def authenticate(self, username: str, password: str) -> User:
        """The user if `password` is right; otherwise count the failure and raise.

        The argon2 check runs outside any transaction (it takes a tenth of a second and must
        not serialise every login); the outcome is then applied in a write transaction that
        re-reads the row, so a lockout reached by concurrent attempts also stops a correct
        password that was checked meanwhile.

        Raises:
            AccountLockedError: the account is locked (also on the failure that locks it).
            UnknownUserError: no such user (same message as a wrong password).
            AuthenticationError: wrong password.
        """
        now = self._clock()
        snapshot = self._snapshot(username)
        if snapshot is None:
            verify_password(_decoy_hash(), password if isinstance(password, str) else "")
            raise UnknownUserError(AUTHENTICATION_FAILED)
        stored_hash, locked_until = snapshot
        if locked_until is not None and locked_until > now:
            raise AccountLockedError(locked_until - now)
        correct = verify_password(stored_hash, password)

        with Session(self._writer) as session, session.begin():
            row = session.get(_UserRow, username, with_for_update=True)
            if row is None:
                outcome: User | AuthenticationError = UnknownUserError(AUTHENTICATION_FAILED)
            elif row.locked_until is not None and row.locked_until > now:
                outcome = AccountLockedError(row.locked_until - now)
            elif correct and row.password_hash == stored_hash:
                row.failed_logins = 0
                row.locked_until = None
                if needs_rehash(stored_hash):
                    row.password_hash = hash_password(password)
                outcome = row.to_user()
            else:
                outcome = self._count_failure(row, now)
        if isinstance(outcome, AuthenticationError):
            raise outcome
        return outcome

    def _snapshot(self, username: object) -> tuple[str, float | None] | None:
        """The stored hash and lockout end of `username`, or None for unknown/invalid names."""
        if not isinstance(username, str) or not USERNAME_PATTERN.fullmatch(username):
            return None
        with Session(self._engine) as session:
            row = session.get(_UserRow, username)
            return None if row is None else (row.password_hash, row.locked_until)

    def _count_failure(self, row: _UserRow, now: float) -> AuthenticationError:
        """Record one failed login on `row`; lock the account when the limit is reached."""
        row.failed_logins += 1
        if row.failed_logins < self._max_failed:
            return AuthenticationError(AUTHENTICATION_FAILED)
        row.failed_logins = 0
        row.locked_until = now + self._lockout_s
        logger.warning(
            "account locked",
            username=row.username,
            lockout_s=self._lockout_s,
            max_failed_logins=self._max_failed,
        )
        return AccountLockedError(self._lockout_s)
