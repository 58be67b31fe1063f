"""Router ε quotas: atomic under threads and processes, exact in micro-ε, and fail closed."""

from __future__ import annotations

import multiprocessing
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fedllm.serving.router.budgets import (
    BudgetLedger,
    LedgerUnavailableError,
    QuotaExceededError,
    Reservation,
)

HOUR = 3600.0


def _ledger(url: str, **overrides) -> BudgetLedger:
    settings = {"user_quota": 1.0, "department_quota": 100.0, "period_s": HOUR, **overrides}
    return BudgetLedger(url, **settings)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'budgets.db'}"


def _try_reserve(ledger: BudgetLedger, epsilon: float) -> Reservation | None:
    try:
        return ledger.reserve("alice", "icu", epsilon)
    except QuotaExceededError:
        return None


def _race(ledgers: list[BudgetLedger], attempts: int, epsilon: float) -> list[Reservation]:
    """Fire `attempts` reservations from 32 threads, spread over `ledgers`."""
    with ThreadPoolExecutor(32) as pool:
        results = pool.map(
            lambda i: _try_reserve(ledgers[i % len(ledgers)], epsilon), range(attempts)
        )
        return [r for r in results if r is not None]


def test_concurrent_threads_fill_the_quota_exactly(url: str) -> None:
    ledger = _ledger(url)
    won = _race([ledger], 200, 0.1)
    assert len(won) == 10
    assert ledger.status("alice", "icu").reserved == 1.0
    for reservation in won:
        ledger.commit(reservation)
    status = ledger.status("alice", "icu")
    assert (status.spent, status.reserved, status.remaining) == (1.0, 0.0, 0.0)
    assert status.department_remaining == 99.0


def test_two_ledger_instances_share_one_quota(url: str) -> None:
    ledgers = [_ledger(url), _ledger(url)]
    won = _race(ledgers, 200, 0.1)
    assert len(won) == 10
    for i, reservation in enumerate(won):
        ledgers[i % 2].commit(reservation)
    assert ledgers[0].status("alice", "icu").spent == 1.0
    assert ledgers[1].status("alice", "icu").remaining == 0.0


def _process_worker(url: str, start, results, attempts: int) -> None:
    """One router process: its own ledger (engine, pool) racing the others after `start`."""
    ledger = _ledger(url)
    start.wait(30)
    won = 0
    for _ in range(attempts):
        reservation = _try_reserve(ledger, 0.1)
        if reservation is not None:
            ledger.commit(reservation)
            won += 1
    results.put(won)


def test_separate_processes_share_one_quota(url: str) -> None:
    _ledger(url)  # create the schema before the race, as a deployed router would have
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [
        context.Process(target=_process_worker, args=(url, start, results, 20)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    start.set()
    won = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert sum(won) == 10
    status = _ledger(url).status("alice", "icu")
    assert (status.spent, status.reserved) == (1.0, 0.0)


def test_micro_epsilon_rounding_never_favours_the_user(url: str) -> None:
    ledger = _ledger(url, user_quota=0.3)
    for _ in range(3):
        ledger.reserve("alice", "icu", 0.1)  # 3 × 0.1 fills 0.3 exactly despite float drift
    with pytest.raises(QuotaExceededError):
        ledger.reserve("alice", "icu", 1e-9)  # costs round up to one micro-ε, never to zero
    tiny = _ledger(url, user_quota=2.9e-6)  # quotas round down: 2 micro-ε
    assert tiny.reserve("bob", "icu", 1e-7).epsilon == 1e-6
    assert tiny.reserve("bob", "icu", 1e-6).epsilon == 1e-6
    with pytest.raises(QuotaExceededError):
        tiny.reserve("bob", "icu", 1e-7)


def test_quota_error_names_scope_and_remaining(url: str) -> None:
    ledger = _ledger(url)
    ledger.reserve("alice", "icu", 0.7)
    with pytest.raises(QuotaExceededError, match="user 'alice'") as raised:
        ledger.reserve("alice", "icu", 0.5)
    assert raised.value.scope == "user"
    assert raised.value.remaining == pytest.approx(0.3)
    assert ledger.status("alice", "icu").reserved == pytest.approx(0.7)


def test_department_quota_caps_a_group_and_rolls_back_the_user(url: str) -> None:
    ledger = _ledger(url, department_quota=1.5)
    ledger.reserve("alice", "icu", 1.0)
    ledger.reserve("bob", "icu", 0.4)
    with pytest.raises(QuotaExceededError, match="department 'icu'") as raised:
        ledger.reserve("bob", "icu", 0.2)  # bob's own quota allows it; icu's does not
    assert raised.value.scope == "department"
    assert raised.value.remaining == pytest.approx(0.1)
    assert ledger.status("bob", "icu").reserved == pytest.approx(0.4)  # user hold rolled back
    with pytest.raises(QuotaExceededError):
        ledger.reserve("carol", "icu", 0.2)
    ledger.reserve("carol", "oncology", 0.2)  # other departments are unaffected
    assert ledger.status("carol", "icu").department_remaining == pytest.approx(0.1)


def test_refund_restores_and_settlements_are_idempotent(url: str) -> None:
    ledger = _ledger(url)
    first = ledger.reserve("alice", "icu", 0.6)
    with pytest.raises(QuotaExceededError):
        ledger.reserve("alice", "icu", 0.6)
    ledger.refund(first)
    ledger.refund(first)
    assert ledger.status("alice", "icu").remaining == 1.0
    with pytest.raises(ValueError, match="already refunded"):
        ledger.commit(first)
    second = ledger.reserve("alice", "icu", 0.6)
    ledger.commit(second)
    ledger.commit(second)
    ledger.refund(second)  # a committed spend is never given back
    status = ledger.status("alice", "icu")
    assert (status.spent, status.reserved) == (0.6, 0.0)
    with pytest.raises(ValueError, match="unknown reservation"):
        ledger.commit(Reservation("no-such-id", "alice", "icu", 0.1))


def test_new_period_starts_at_zero_and_settles_in_the_old_one(url: str) -> None:
    now = [10 * HOUR + 5.0]
    ledger = _ledger(url, clock=lambda: now[0])
    ledger.commit(ledger.reserve("alice", "icu", 0.7))
    pending = ledger.reserve("alice", "icu", 0.3)
    assert ledger.status("alice", "icu").period_end == datetime.fromtimestamp(11 * HOUR, tz=UTC)
    now[0] += HOUR
    status = ledger.status("alice", "icu")
    assert (status.spent, status.reserved, status.remaining) == (0.0, 0.0, 1.0)
    ledger.commit(pending)  # made in the old period, settled there
    assert ledger.status("alice", "icu").spent == 0.0
    ledger.reserve("alice", "icu", 1.0)


def test_ledger_and_quota_overrides_survive_reopening(url: str) -> None:
    ledger = _ledger(url, quota_overrides={"alice": 2.0})
    assert ledger.status("alice", "icu").quota == 2.0
    ledger.commit(ledger.reserve("alice", "icu", 0.5))
    crashed = ledger.reserve("alice", "icu", 0.25)  # never settled: the router "crashed"
    ledger.set_user_quota("bob", 0.1)
    ledger.set_department_quota("icu", 3.0)
    ledger.close()

    reopened = _ledger(url, quota_overrides={"alice": 2.0})
    alice = reopened.status("alice", "icu")
    assert (alice.spent, alice.reserved, alice.remaining) == (0.5, 0.25, 1.25)
    assert alice.department_remaining == 2.25
    assert reopened.status("bob", "icu").quota == 0.1
    with pytest.raises(QuotaExceededError):
        reopened.reserve("bob", "icu", 0.2)
    reopened.set_user_quota("alice", 0.6)  # the admin's quota wins over configuration
    with pytest.raises(QuotaExceededError):
        reopened.reserve("alice", "icu", 0.1)
    reopened.refund(crashed)
    reopened.reserve("alice", "icu", 0.1)


def test_missing_database_directory_fails_closed_then_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "not-yet"
    ledger = _ledger(f"sqlite:///{directory / 'budgets.db'}")
    with pytest.raises(LedgerUnavailableError):
        ledger.reserve("alice", "icu", 0.1)
    with pytest.raises(LedgerUnavailableError):
        ledger.status("alice", "icu")
    with pytest.raises(LedgerUnavailableError):
        ledger.set_user_quota("alice", 0.5)
    directory.mkdir()
    ledger.commit(ledger.reserve("alice", "icu", 0.1))
    assert ledger.status("alice", "icu").spent == 0.1


def test_corrupt_or_vanished_database_fails_closed(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(LedgerUnavailableError):
        _ledger(f"sqlite:///{garbage}").reserve("alice", "icu", 0.1)

    path = tmp_path / "budgets.db"
    ledger = _ledger(f"sqlite:///{path}")
    reservation = ledger.reserve("alice", "icu", 0.1)
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE budget_usage")
    with pytest.raises(LedgerUnavailableError):
        ledger.commit(reservation)
    with pytest.raises(LedgerUnavailableError):
        ledger.reserve("alice", "icu", 0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"user_quota": -1.0}, "quota"),
        ({"department_quota": float("nan")}, "quota"),
        ({"period_s": 0}, "period_s"),
        ({"quota_overrides": {"": 1.0}}, "user_id"),
    ],
)
def test_invalid_configuration_is_rejected(url: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _ledger(url, **kwargs)


def test_invalid_requests_and_urls_are_rejected(url: str) -> None:
    ledger = _ledger(url)
    for epsilon in (0.0, -0.1, float("inf"), True):
        with pytest.raises(ValueError, match="epsilon"):
            ledger.reserve("alice", "icu", epsilon)
    with pytest.raises(ValueError, match="user_id"):
        ledger.reserve("", "icu", 0.1)
    with pytest.raises(ValueError, match="department"):
        ledger.status("alice", "")
    with pytest.raises(ValueError, match="quota"):
        ledger.set_department_quota("icu", -2.0)
    with pytest.raises(ValueError, match="invalid budget database URL"):
        _ledger("nosuchdialect://somewhere/db")
