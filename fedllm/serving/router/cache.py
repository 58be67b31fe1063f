"""Per-user cache of deterministic answers (temperature 0, no consensus).

Keys always start with the user, so one clinician's cached answer (which may echo their
prompt) is never served to another. Consensus answers are never cached: each one is a fresh
DP release and must be charged; sampled answers are not deterministic, so caching them would
change what users get.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from cachetools import TTLCache


def cache_key(user: str, endpoint: str, request: dict[str, Any]) -> str:
    """A canonical key: user, endpoint and the request's JSON with sorted keys."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{user}\x00{endpoint}\x00{canonical}"


class ResponseCache:
    """LRU + TTL cache of JSON-able answers; ``max_entries == 0`` or ``ttl_s == 0`` disables it."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self._lock = threading.Lock()
        self._configure(max_entries, ttl_s)

    def _configure(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: TTLCache[str, Any] | None = (
            TTLCache(maxsize=max_entries, ttl=ttl_s) if max_entries > 0 and ttl_s > 0 else None
        )

    @property
    def enabled(self) -> bool:
        """Whether anything can be cached."""
        return self._entries is not None

    def get(self, key: str) -> Any | None:
        """The cached answer, or None."""
        if self._entries is None:
            return None
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, value: Any) -> None:
        """Remember an answer until the TTL runs out (or it is evicted)."""
        if self._entries is None:
            return
        with self._lock:
            self._entries[key] = value

    def reconfigure(self, *, max_entries: int | None = None, ttl_s: float | None = None) -> None:
        """New size or TTL (admin API); drops every entry."""
        with self._lock:
            self._configure(
                self.max_entries if max_entries is None else max_entries,
                self.ttl_s if ttl_s is None else ttl_s,
            )

    def __len__(self) -> int:
        if self._entries is None:
            return 0
        with self._lock:
            return len(self._entries)
