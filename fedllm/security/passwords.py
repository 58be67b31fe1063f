"""Password hashing with argon2id, the memory-hard hash recommended for stored passwords.

A stolen user database must not reveal passwords: argon2id makes every guess cost memory and
time, and the salt in each hash defeats precomputed tables. Parameters are argon2-cffi's
defaults (RFC 9106 "second recommended" profile); they are stored in every hash, so raising
them later keeps old hashes verifiable and `needs_rehash` tells callers when to upgrade one.
Servers run hashing on a `HashingPool`, so a login flood cannot occupy the threads other work
needs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher()
T = TypeVar("T")


def hash_password(password: str) -> str:
    """The argon2id hash of `password` (salted; encoded with its parameters)."""
    if not isinstance(password, str):
        raise TypeError("password must be a string")
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether `password` matches `password_hash`.

    Returns False, never raises, for a mismatch, a malformed or foreign hash, or non-string
    input: a login attempt is user input and must not be able to crash the caller.
    """
    if not isinstance(password_hash, str) or not isinstance(password, str):
        return False
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
    except UnicodeEncodeError:  # a lone surrogate from JSON: no stored password can match it
        return False


def needs_rehash(password_hash: str) -> bool:
    """Whether `password_hash` was made with weaker parameters than the current ones."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True


class HashingPoolFullError(RuntimeError):
    """Every worker is busy and the queue is full: the caller should answer 503 and retry later."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("password hashing is saturated; retry later")
        self.retry_after_s = retry_after_s


def default_hashing_workers() -> int:
    """Half the CPUs, at least 1 and at most 4: argon2 is CPU- and memory-bound, and the
    other half must stay free for the event loop and the shared worker threads."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


# Added to the hashing threads' nice value: under CPU contention the scheduler then gives the
# event loop and the other threads about nine tenths of a core that argon2 also wants.
HASHING_NICENESS = 10


def _lower_thread_priority() -> None:
    """Raise this thread's nice value (Linux schedules threads separately); no-op elsewhere."""
    try:
        thread = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + HASHING_NICENESS
        )
    except (AttributeError, OSError):
        return


class HashingPool:
    """A small, bounded thread pool for password hashing, separate from everything else.

    argon2 costs a tenth of a second of CPU per login on purpose. Run on a shared pool, a flood
    of logins (even wrong ones) queues in front of every other blocking task of the process;
    here at most `workers` hashes run and `queue` wait, and any further submission is refused
    at once with `HashingPoolFullError` instead of queueing without bound. The hashing threads
    run at a lower CPU priority (`HASHING_NICENESS`), so a saturated pool slows logins, not the
    requests of users who already hold a token.
    """

    def __init__(self, workers: int | None = None, queue: int = 16) -> None:
        workers = default_hashing_workers() if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
            raise ValueError(f"queue must be an integer >= 0, got {queue!r}")
        self.workers = workers
        self.capacity = workers + queue
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="argon2", initializer=_lower_thread_priority
        )
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not yet finished (running or queued)."""
        with self._lock:
            return self._in_flight

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on the pool; HashingPoolFullError when it is at capacity.

        The slot is released when the job finishes, not when its caller stops waiting, so a
        client that disconnects cannot make room for more work than the pool runs.
        """
        with self._lock:
            if self._in_flight >= self.capacity:
                # The queue drains at about one hash per worker per ~0.1 s; ask for a second.
                raise HashingPoolFullError(retry_after_s=1.0)
            self._in_flight += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`submit`, awaited from the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def shutdown(self) -> None:
        """Stop accepting work; queued jobs are cancelled, running ones finish."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _release(self, _future: Future[Any] | None) -> None:
        with self._lock:
            self._in_flight -= 1
