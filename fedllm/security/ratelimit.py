"""Per-key token-bucket rate limits (per user, per client address, per login name).

Each key gets a bucket of `burst` tokens refilled at `rate_per_s`; a request spends one. Memory
stays bounded under a flood of distinct keys (e.g. random usernames at the login endpoint):
buckets that have refilled completely carry no information and are dropped first, and beyond
`max_keys` the least recently used bucket is dropped even if it is not full.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """Thread-safe token buckets keyed by string. `clock` is monotonic seconds (injectable)."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (isinstance(rate_per_s, int | float) and math.isfinite(rate_per_s)):
            raise ValueError(f"rate_per_s must be a finite number, got {rate_per_s!r}")
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be an integer >= 1, got {max_keys!r}")
        self._rate = float(rate_per_s)
        self._burst = float(burst)
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens, time of last update); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def try_acquire(self, key: str) -> float:
        """Spend one token of `key`'s bucket: 0.0 if allowed, else seconds until one is due."""
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.pop(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / self._rate
            self._buckets[key] = (tokens, now)
            self._evict(now)
            return wait

    def __len__(self) -> int:
        """Buckets currently held."""
        with self._lock:
            return len(self._buckets)

    def _evict(self, now: float) -> None:
        """Drop full (idle) buckets from the LRU end, then any beyond `max_keys`."""
        while self._buckets:
            key, (tokens, last) = next(iter(self._buckets.items()))
            if tokens + (now - last) * self._rate < self._burst:
                break
            del self._buckets[key]
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
