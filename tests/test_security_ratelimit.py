"""Token-bucket rate limits: burst, refill, retry-after, isolation, bounded memory, threads."""

from __future__ import annotations

import threading

import pytest

from fedllm.security.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_retry_after_then_refill() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.try_acquire("alice") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire("alice") == pytest.approx(0.5)
    clock.now += 0.25
    assert limiter.try_acquire("alice") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.try_acquire("alice") == 0.0
    assert limiter.try_acquire("alice") > 0.0


def test_keys_are_independent() -> None:
    limiter = RateLimiter(rate_per_s=1.0, burst=1, clock=FakeClock())
    assert limiter.try_acquire("alice") == 0.0
    assert limiter.try_acquire("alice") > 0.0
    assert limiter.try_acquire("bob") == 0.0


def test_idle_keys_are_evicted_and_memory_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=1.0, burst=2, max_keys=50, clock=clock)
    for n in range(1000):
        limiter.try_acquire(f"user-{n}")
    assert len(limiter) <= 50
    clock.now += 10.0  # every bucket has refilled: none carries information any more
    limiter.try_acquire("fresh")
    assert len(limiter) == 1


def test_eviction_keeps_a_throttled_key_throttled() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=0.1, burst=1, max_keys=1000, clock=clock)
    limiter.try_acquire("attacker")
    for n in range(100):
        limiter.try_acquire(f"noise-{n}")
    assert limiter.try_acquire("attacker") > 0.0


def test_threads_never_exceed_the_burst() -> None:
    limiter = RateLimiter(rate_per_s=1e-6, burst=25)
    granted = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            if limiter.try_acquire("shared") == 0.0:
                with lock:
                    granted.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 25


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_per_s": 0, "burst": 1},
        {"rate_per_s": 1, "burst": 0},
        {"rate_per_s": float("nan"), "burst": 1},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"rate_per_s|burst"):
        RateLimiter(**kwargs)
