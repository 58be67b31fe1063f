"""Password hashing and the user store: validation, lockout, persistence, timing parity."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from fedllm.security.passwords import (
    HASHING_NICENESS,
    HashingPool,
    HashingPoolFullError,
    default_hashing_workers,
    hash_password,
    verify_password,
)
from fedllm.security.users import (
    AccountLockedError,
    AuthenticationError,
    Role,
    UnknownUserError,
    User,
    UserStore,
)

PASSWORD = "correct horse battery"


class FakeClock:
    """Unix time that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'users.db'}"


def test_hash_is_salted_argon2id_and_verifies() -> None:
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first.startswith("$argon2id$")
    assert first != second  # salted
    assert verify_password(first, PASSWORD)
    assert not verify_password(first, PASSWORD + "x")


@pytest.mark.parametrize("bad_hash", ["", "not a hash", "$argon2id$v=19$m=65536,t=3,p=4$zz$zz"])
def test_verify_never_raises_on_malformed_hash(bad_hash: str) -> None:
    assert verify_password(bad_hash, PASSWORD) is False


def test_verify_returns_false_for_non_string_input() -> None:
    assert verify_password(hash_password(PASSWORD), None) is False  # type: ignore[arg-type]


def test_add_get_list_remove(url: str) -> None:
    store = UserStore(url)
    added = store.add_user("alice@hospital-a", PASSWORD, Role.CLINICIAN, "cardiology")
    store.add_user("bob", PASSWORD, "researcher", "oncology")
    assert added == User("alice@hospital-a", Role.CLINICIAN, "cardiology")
    assert store.get("bob") == User("bob", Role.RESEARCHER, "oncology")
    assert [a.user.username for a in store.accounts()] == ["alice@hospital-a", "bob"]
    store.remove_user("bob")
    assert store.get("bob") is None
    with pytest.raises(ValueError, match="no user"):
        store.remove_user("bob")


@pytest.mark.parametrize(
    ("username", "password", "role", "department", "message"),
    [
        ("", PASSWORD, "clinician", "cardiology", "invalid username"),
        ("a" * 65, PASSWORD, "clinician", "cardiology", "invalid username"),
        ("bad name", PASSWORD, "clinician", "cardiology", "invalid username"),
        ("x';drop", PASSWORD, "clinician", "cardiology", "invalid username"),
        ("carol", "short", "clinician", "cardiology", "password must be"),
        ("carol", PASSWORD, "surgeon", "cardiology", "invalid role"),
        ("carol", PASSWORD, "clinician", "", "invalid department"),
        ("carol", PASSWORD, "clinician", "a/b", "invalid department"),
    ],
)
def test_add_user_rejects_invalid_values(
    url: str, username: str, password: str, role: str, department: str, message: str
) -> None:
    store = UserStore(url)
    with pytest.raises(ValueError, match=message):
        store.add_user(username, password, role, department)
    assert store.accounts() == []


def test_duplicate_user_is_refused(url: str) -> None:
    store = UserStore(url)
    store.add_user("alice", PASSWORD, Role.ADMIN, "it")
    with pytest.raises(ValueError, match="already exists"):
        store.add_user("alice", PASSWORD + "2", Role.CLINICIAN, "cardiology")
    assert store.authenticate("alice", PASSWORD).role is Role.ADMIN


def test_unknown_user_and_wrong_password_look_identical(url: str) -> None:
    store = UserStore(url)
    store.add_user("alice", PASSWORD, Role.CLINICIAN, "cardiology")
    with pytest.raises(AuthenticationError) as wrong:
        store.authenticate("alice", "wrong password")
    with pytest.raises(AuthenticationError) as unknown:
        store.authenticate("mallory", "wrong password")
    with pytest.raises(AuthenticationError) as invalid:
        store.authenticate("not a valid name!", "wrong password")
    # One message for all three (a login cannot probe which users exist); the type tells the
    # router's audit log to keep only a digest of a name that matches no account.
    assert type(wrong.value) is AuthenticationError
    assert type(unknown.value) is type(invalid.value) is UnknownUserError
    assert str(wrong.value) == str(unknown.value) == str(invalid.value)


def test_unknown_user_still_spends_a_hash_verification(url: str) -> None:
    store = UserStore(url)
    store.add_user("alice", PASSWORD, Role.CLINICIAN, "cardiology")
    with pytest.raises(AuthenticationError):
        store.authenticate("warmup", "x")  # builds the decoy hash once

    def fastest(username: str) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            with pytest.raises(AuthenticationError):
                store.authenticate(username, "wrong password")
            times.append(time.perf_counter() - start)
        store.unlock("alice")
        return min(times)

    known, unknown = fastest("alice"), fastest("mallory")
    # Without the decoy verification an unknown user would answer in well under a millisecond.
    assert unknown > 0.3 * known


def test_lockout_after_max_failures_then_unlock_after_time(url: str) -> None:
    clock = FakeClock()
    store = UserStore(url, max_failed_logins=3, lockout_s=60.0, clock=clock)
    store.add_user("alice", PASSWORD, Role.CLINICIAN, "cardiology")
    for _ in range(2):
        with pytest.raises(AuthenticationError) as error:
            store.authenticate("alice", "wrong password")
        assert not isinstance(error.value, AccountLockedError)
    with pytest.raises(AccountLockedError) as locked:
        store.authenticate("alice", "wrong password")
    assert locked.value.retry_after_s == pytest.approx(60.0)

    clock.now += 20
    with pytest.raises(AccountLockedError) as still_locked:
        store.authenticate("alice", PASSWORD)  # even the right password is refused
    assert still_locked.value.retry_after_s == pytest.approx(40.0)

    clock.now += 41
    assert store.authenticate("alice", PASSWORD).username == "alice"


def test_success_resets_the_failure_count(url: str) -> None:
    store = UserStore(url, max_failed_logins=2, lockout_s=60.0, clock=FakeClock())
    store.add_user("alice", PASSWORD, Role.CLINICIAN, "cardiology")
    with pytest.raises(AuthenticationError):
        store.authenticate("alice", "wrong password")
    store.authenticate("alice", PASSWORD)
    with pytest.raises(AuthenticationError) as error:
        store.authenticate("alice", "wrong password")
    assert not isinstance(error.value, AccountLockedError)


def test_failures_and_lockout_survive_reopening(url: str) -> None:
    clock = FakeClock()
    store = UserStore(url, max_failed_logins=2, lockout_s=300.0, clock=clock)
    store.add_user("alice", PASSWORD, Role.CLINICIAN, "cardiology")
    with pytest.raises(AuthenticationError):
        store.authenticate("alice", "wrong password")
    store.close()

    reopened = UserStore(url, max_failed_logins=2, lockout_s=300.0, clock=clock)
    assert reopened.accounts()[0].failed_logins == 1
    with pytest.raises(AccountLockedError):
        reopened.authenticate("alice", "wrong password")
    reopened.close()

    again = UserStore(url, max_failed_logins=2, lockout_s=300.0, clock=clock)
    with pytest.raises(AccountLockedError):
        again.authenticate("alice", PASSWORD)
    again.unlock("alice")
    assert again.authenticate("alice", PASSWORD).department == "cardiology"
    assert again.accounts()[0].locked_until is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_failed_logins": 0}, "max_failed_logins"),
        ({"lockout_s": 0.0}, "lockout_s"),
        ({"lockout_s": float("inf")}, "lockout_s"),
    ],
)
def test_store_rejects_bad_policy(url: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UserStore(url, **kwargs)


def test_hashing_pool_refuses_beyond_workers_plus_queue() -> None:
    pool = HashingPool(workers=1, queue=2)
    release = threading.Event()
    try:
        futures = [pool.submit(release.wait, 5) for _ in range(3)]
        assert pool.in_flight == 3
        with pytest.raises(HashingPoolFullError) as full:
            pool.submit(release.wait, 5)
        assert full.value.retry_after_s > 0
        release.set()
        assert all(future.result(timeout=5) for future in futures)
        deadline = time.monotonic() + 5
        while pool.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        # The slots come back when the jobs finish, so the pool accepts work again.
        assert pool.in_flight == 0
        assert asyncio.run(pool.run(verify_password, hash_password("x" * 8), "x" * 8))
    finally:
        release.set()
        pool.shutdown()


def test_hashing_pool_size_follows_the_cpus_and_rejects_nonsense() -> None:
    assert 1 <= default_hashing_workers() <= 4
    assert HashingPool().workers == default_hashing_workers()
    with pytest.raises(ValueError, match="workers"):
        HashingPool(workers=0)
    with pytest.raises(ValueError, match="queue"):
        HashingPool(workers=1, queue=-1)


def test_hashing_threads_yield_the_cpu_to_other_work() -> None:
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    pool = HashingPool(workers=1, queue=0)
    try:
        assert pool.submit(niceness).result(timeout=5) == min(19, niceness() + HASHING_NICENESS)
    finally:
        pool.shutdown()
