"""The server's ledger: what each round of each run did, durable enough to resume a run.

Per round it keeps the cohort, every hospital's utility, inclusion probability and
eligibility (with the reason when ineligible), a mirror of the privacy events each hospital
reports having charged to its own ledger, and the ε it reports; per run, the configuration,
the last completed round and the latest global adapter checkpoint. A round is written in one
transaction, so after a crash the ledger shows either the whole round or none of it, and a
restarted server resumes from `resume_state`.

The hospitals' own ledgers (`node_ledger`) remain the authority over their budgets. The mirror
lets the server plan (it never asks a hospital to overspend) and audit: as there, ε is always
re-derived from events, and the reported ε is stored only to compare against.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from numbers import Real
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Integer,
    String,
    Text,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedllm.privacy.accountant import compute_epsilon
from fedllm.privacy.events import PrivacyEvent, event_from_dict, event_to_dict
from fedllm.security.encryption import EncryptedJSON, KeyRingSource
from fedllm.storage.database import create_schema, sql_engines


class _Base(DeclarativeBase):
    """Private metadata, so the server's tables can share a database with other schemas."""


class _Run(_Base):
    """One federated run: its configuration and how far it got."""

    __tablename__ = "server_runs"

    run_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    config_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_completed_round: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint: Mapped[str | None] = mapped_column(Text, nullable=True)


class _Round(_Base):
    """One completed round of a run."""

    __tablename__ = "server_rounds"
    __table_args__ = (ForeignKeyConstraint(["run_id"], ["server_runs.run_id"]),)

    run_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    round_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    checkpoint: Mapped[str | None] = mapped_column(Text, nullable=True)


class _RoundHospital(_Base):
    """What the server knew and decided about one hospital in one round."""

    __tablename__ = "server_round_hospitals"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "round_id"], ["server_rounds.run_id", "server_rounds.round_id"]
        ),
    )

    run_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    round_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hospital: Mapped[str] = mapped_column(String(255), primary_key=True)
    cohort_position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    utility: Mapped[float | None] = mapped_column(Float, nullable=True)
    inclusion_probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    eligible: Mapped[bool] = mapped_column(Boolean)
    ineligible_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    reported_epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)


class _MirroredEvent(_Base):
    """One privacy event a hospital reported charging in one round of one run."""

    __tablename__ = "server_privacy_events"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "round_id"], ["server_rounds.run_id", "server_rounds.round_id"]
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(255))
    round_id: Mapped[int] = mapped_column(Integer)
    hospital: Mapped[str] = mapped_column(String(255), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    # JSON, AES-256-GCM encrypted when the ledger has a key ring (`EncryptedJSON`).
    event: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class ResumeState:
    """Everything a restarted server needs to continue a run after its last completed round."""

    run_id: str
    config_json: str
    last_completed_round: int
    checkpoint: str | None


def _parse_config(config_json: str) -> Any:
    """Parse a run configuration; JSON equality (not text equality) decides sameness."""
    try:
        return json.loads(config_json)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"config_json must be a JSON document: {error}") from error


def _check_name(what: str, name: object) -> str:
    """Reject empty or non-string identifiers before they become primary keys."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    return name


def _check_number(what: str, value: object, low: float, high: float) -> float:
    """Return `value` as a float in [low, high], rejecting bools and NaN."""
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be in [{low}, {high}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _RoundInput:
    """A round's arguments after validation: only these ever reach the database."""

    cohort: list[str]
    utilities: dict[str, float]
    inclusion_probabilities: dict[str, float]
    ineligible: dict[str, str]
    events: dict[str, list[dict[str, Any]]]
    reported_epsilon: dict[str, float]

    @property
    def hospitals(self) -> list[str]:
        """Every hospital the round mentions, sorted."""
        named = set(self.cohort).union(
            self.utilities,
            self.inclusion_probabilities,
            self.ineligible,
            self.events,
            self.reported_epsilon,
        )
        return sorted(named)


def _validate_round(
    cohort: Sequence[str],
    utilities: Mapping[str, float],
    inclusion_probabilities: Mapping[str, float],
    ineligible: Mapping[str, str],
    hospital_events: Mapping[str, Sequence[Mapping[str, Any]]],
    reported_epsilon: Mapping[str, float],
) -> _RoundInput:
    """Check a round for consistency and normalise its events, before any write starts."""
    members = [_check_name("cohort member", h) for h in cohort]
    if len(set(members)) != len(members):
        raise ValueError(f"cohort lists a hospital twice: {members}")
    excluded = sorted(set(members) & set(ineligible))
    if excluded:
        raise ValueError(f"hospitals both selected and ineligible: {excluded}")
    probabilities = {
        _check_name("hospital", h): _check_number(f"inclusion probability of {h!r}", p, 0, 1)
        for h, p in inclusion_probabilities.items()
    }
    impossible = sorted(h for h in members if probabilities.get(h, 1.0) == 0)
    if impossible:
        raise ValueError(f"selected hospitals with inclusion probability 0: {impossible}")
    return _RoundInput(
        cohort=members,
        utilities={
            _check_name("hospital", h): _check_number(f"utility of {h!r}", u, -math.inf, math.inf)
            for h, u in utilities.items()
        },
        inclusion_probabilities=probabilities,
        ineligible={_check_name("hospital", h): str(r) for h, r in ineligible.items()},
        events={
            _check_name("hospital", h): [event_to_dict(event_from_dict(e)) for e in events]
            for h, events in hospital_events.items()
        },
        reported_epsilon={
            _check_name("hospital", h): _check_number(f"reported ε of {h!r}", e, 0, math.inf)
            for h, e in reported_epsilon.items()
        },
    )


class ServerLedger:
    """Persistent record of a server's runs and rounds; any SQLAlchemy URL, SQLite by default.

    Every method opens its own short session, so several ledger objects (or processes) on
    one database see each other's committed rounds; writes take SQLite's write lock at BEGIN
    (as `NodePrivacyLedger` does) so two servers can never interleave one run's rounds. With a
    ``keyring`` (from the ServerApp or CLI, never looked up here) mirrored events are stored
    AES-256-GCM encrypted, and a plaintext or altered row is refused.
    """

    def __init__(self, url: str, *, keyring: KeyRingSource | None = None) -> None:
        self._events = EncryptedJSON(keyring, name="server_privacy_events.event")
        self._engine, self._writer = sql_engines(url)
        create_schema(_Base.metadata, self._writer)

    def start_run(self, run_id: str, config_json: str) -> None:
        """Register a run, or accept it again unchanged (a restarted server calls this too).

        Raises ValueError if `run_id` exists with a different configuration: resuming a run
        under other settings would mix two experiments (and two privacy plans) in one history.
        Two servers registering the same new run at once (PostgreSQL: FOR UPDATE cannot lock
        a row that does not exist yet) race on its insert; the loser retries and then finds it.
        """
        _check_name("run_id", run_id)
        config = _parse_config(config_json)
        try:
            self._start_run(run_id, config_json, config)
        except IntegrityError:
            self._start_run(run_id, config_json, config)

    def _start_run(self, run_id: str, config_json: str, config: Any) -> None:
        with Session(self._writer) as session, session.begin():
            row = session.get(_Run, run_id, with_for_update=True)
            if row is None:
                session.add(
                    _Run(
                        run_id=run_id,
                        config_json=config_json,
                        created_at=datetime.now(UTC),
                        last_completed_round=0,
                        checkpoint=None,
                    )
                )
            elif _parse_config(row.config_json) != config:
                raise ValueError(
                    f"run {run_id!r} already exists with a different configuration; "
                    "use a new run_id for new settings"
                )

    def record_round(
        self,
        run_id: str,
        round_id: int,
        *,
        cohort: list[str],
        utilities: dict[str, float],
        inclusion_probabilities: dict[str, float],
        ineligible: dict[str, str],
        hospital_events: dict[str, list[dict]],
        reported_epsilon: dict[str, float],
        checkpoint: str | None,
    ) -> None:
        """Record a completed round in ONE transaction: all of it is written, or nothing.

        `hospital_events` maps each hospital to the event dicts (`event_to_dict`) it charged
        this round, which may include hospitals outside the cohort (e.g. a noised utility
        statistic). `checkpoint` is the global adapter saved after the round; None keeps the
        previous one. Rounds must increase (gaps are allowed: a round whose aggregation
        failed is not recorded). Raises ValueError on invalid input, an unknown run or a
        round_id that is not after the last completed round.
        """
        _check_name("run_id", run_id)
        if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 1:
            raise ValueError(f"round_id must be an integer >= 1, got {round_id!r}")
        if checkpoint is not None:
            _check_name("checkpoint", checkpoint)
        data = _validate_round(
            cohort,
            utilities,
            inclusion_probabilities,
            ineligible,
            hospital_events,
            reported_epsilon,
        )
        positions = {h: i for i, h in enumerate(data.cohort)}
        with Session(self._writer) as session, session.begin():
            run = session.get(_Run, run_id, with_for_update=True)
            if run is None:
                raise ValueError(f"unknown run {run_id!r}; call start_run first")
            if round_id <= run.last_completed_round:
                raise ValueError(
                    f"round {round_id} of run {run_id!r} is not after the last completed "
                    f"round {run.last_completed_round}"
                )
            session.add(
                _Round(
                    run_id=run_id,
                    round_id=round_id,
                    recorded_at=datetime.now(UTC),
                    checkpoint=checkpoint,
                )
            )
            # The round row first: nothing maps the foreign keys as relationships, so the unit
            # of work would not order the inserts, and PostgreSQL (unlike SQLite by default)
            # enforces the keys.
            session.flush()
            session.add_all(
                _RoundHospital(
                    run_id=run_id,
                    round_id=round_id,
                    hospital=h,
                    cohort_position=positions.get(h),
                    utility=data.utilities.get(h),
                    inclusion_probability=data.inclusion_probabilities.get(h),
                    eligible=h not in data.ineligible,
                    ineligible_reason=data.ineligible.get(h),
                    reported_epsilon=data.reported_epsilon.get(h),
                )
                for h in data.hospitals
            )
            session.add_all(
                _MirroredEvent(
                    run_id=run_id,
                    round_id=round_id,
                    hospital=h,
                    kind=e["kind"],
                    event=self._events.dumps(e),
                )
                for h in sorted(data.events)
                for e in data.events[h]
            )
            run.last_completed_round = round_id
            if checkpoint is not None:
                run.checkpoint = checkpoint

    def hospital_events(self, run_id: str | None, hospital: str) -> list[PrivacyEvent]:
        """Events mirrored for `hospital` in `run_id` (None: across all runs), in order."""
        query = select(_MirroredEvent.event).where(_MirroredEvent.hospital == hospital)
        if run_id is not None:
            query = query.where(_MirroredEvent.run_id == run_id)
        with Session(self._engine) as session:
            rows = session.scalars(query.order_by(_MirroredEvent.id))
            return [event_from_dict(self._events.loads(e)) for e in rows]

    def spent_epsilon(self, hospital: str, delta: float, accountant: str = "pld") -> float:
        """ε of every event mirrored for `hospital` across all runs (its lifetime spend).

        Derived from the events, never from reported ε. Covers only runs this ledger saw;
        the hospital's own ledger is authoritative.
        """
        return compute_epsilon(self.hospital_events(None, hospital), delta, accountant)

    def projected_epsilon(
        self,
        hospital: str,
        extra: Sequence[PrivacyEvent],
        delta: float,
        accountant: str = "pld",
    ) -> float:
        """ε `hospital` would have spent after also running `extra`: the cost of planning it."""
        events = [*self.hospital_events(None, hospital), *extra]
        return compute_epsilon(events, delta, accountant)

    def last_completed_round(self, run_id: str) -> int:
        """The last round recorded for `run_id`; 0 if none (or the run is unknown)."""
        with Session(self._engine) as session:
            run = session.get(_Run, run_id)
            return 0 if run is None else run.last_completed_round

    def checkpoint(self, run_id: str) -> str | None:
        """The latest global adapter checkpoint recorded for `run_id`, if any."""
        with Session(self._engine) as session:
            run = session.get(_Run, run_id)
            return None if run is None else run.checkpoint

    def resume_state(self, run_id: str) -> ResumeState | None:
        """What a restarted server needs to continue `run_id`; None if it never started."""
        with Session(self._engine) as session:
            run = session.get(_Run, run_id)
            if run is None:
                return None
            return ResumeState(
                run_id=run.run_id,
                config_json=run.config_json,
                last_completed_round=run.last_completed_round,
                checkpoint=run.checkpoint,
            )

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        """Every recorded round of `run_id`, in order, as plain dicts.

        Keys: round_id, recorded_at (UTC ISO 8601), cohort (in selection order), utilities,
        inclusion_probabilities, ineligible (hospital → reason), hospital_events (hospital →
        event dicts), reported_epsilon and checkpoint (None when the round saved none).
        """
        with Session(self._engine) as session:
            rounds = session.scalars(
                select(_Round).where(_Round.run_id == run_id).order_by(_Round.round_id)
            ).all()
            hospitals = session.scalars(
                select(_RoundHospital)
                .where(_RoundHospital.run_id == run_id)
                .order_by(_RoundHospital.hospital)
            ).all()
            events = session.scalars(
                select(_MirroredEvent)
                .where(_MirroredEvent.run_id == run_id)
                .order_by(_MirroredEvent.id)
            ).all()
            result = {
                r.round_id: {
                    "round_id": r.round_id,
                    "recorded_at": _as_utc(r.recorded_at).isoformat(),
                    "cohort": [],
                    "utilities": {},
                    "inclusion_probabilities": {},
                    "ineligible": {},
                    "hospital_events": {},
                    "reported_epsilon": {},
                    "checkpoint": r.checkpoint,
                }
                for r in rounds
            }
            for row in hospitals:
                _add_hospital(result[row.round_id], row)
            selected = (row for row in hospitals if row.cohort_position is not None)
            for row in sorted(selected, key=lambda row: row.cohort_position or 0):
                result[row.round_id]["cohort"].append(row.hospital)
            for event in events:
                result[event.round_id]["hospital_events"].setdefault(event.hospital, []).append(
                    event_to_dict(event_from_dict(self._events.loads(event.event)))
                )
            return list(result.values())


def _add_hospital(round_dict: dict[str, Any], row: _RoundHospital) -> None:
    """Spread one hospital's row over the round dict's per-hospital maps."""
    for key, value in (
        ("utilities", row.utility),
        ("inclusion_probabilities", row.inclusion_probability),
        ("ineligible", row.ineligible_reason),
        ("reported_epsilon", row.reported_epsilon),
    ):
        if value is not None:
            round_dict[key][row.hospital] = value


def _as_utc(moment: datetime) -> datetime:
    """SQLite drops time zones; every stored time is UTC, so restore that on the way out."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
