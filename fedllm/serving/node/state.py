"""What the inference server's endpoints share: its settings, backend, ledger and sessions.

One :class:`NodeState` per app, kept on ``app.state.node``; the endpoints receive it through
the :data:`Node` dependency instead of closing over it, so each group of endpoints is a module
of its own (:mod:`.probes`, :mod:`.completions`, :mod:`.ballots`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from cachetools import TTLCache
from fastapi import Depends, HTTPException, Request

from fedllm.privacy.consensus import ConsensusMechanism
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.serving.node.backends import GenerationBackend
from fedllm.serving.node.config import NodeServerConfig
from fedllm.telemetry.tracing import Tracing


@dataclass
class Session:
    """An opened consensus session: what was charged and how many ballots it has used."""

    mechanism: ConsensusMechanism
    max_tokens: int
    votes: int = 0


def unprocessable(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, for limits checked by the node."""
    return HTTPException(
        status_code=422, detail=[{"type": "value_error", "loc": ["body", field], "msg": message}]
    )


class NodeState:
    """Mutable server state shared by the endpoints, each part under its own lock."""

    def __init__(
        self,
        config: NodeServerConfig,
        backend: GenerationBackend,
        ledger: NodePrivacyLedger | None,
        tracing: Tracing,
    ) -> None:
        self.config = config
        self.backend = backend
        self.ledger = ledger
        self.tracing = tracing
        self.in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.sessions: TTLCache[str, Session] = TTLCache(
            maxsize=config.max_sessions, ttl=config.session_ttl_s
        )
        self.sessions_lock = threading.Lock()
        self.open_lock = threading.Lock()
        # Ballot noise: seeded from OS entropy, never from anything a caller or config knows.
        self._rng = np.random.default_rng()
        self._rng_lock = threading.Lock()

    def ballot(self, mechanism: ConsensusMechanism, vote: int, n_candidates: int) -> list[float]:
        """The noisy ballot for `vote` (numpy generators are not thread-safe: one at a time)."""
        with self._rng_lock:
            return mechanism.ballot(vote, n_candidates, self._rng)

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Count a request in ``in_flight`` (the router's least-busy policy reads it)."""
        with self._in_flight_lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._in_flight_lock:
                self.in_flight -= 1

    def remaining_epsilon(self) -> float | None:
        """ε left under the hospital's cap, re-derived from its ledger's events."""
        if self.ledger is None:
            return None
        return max(0.0, self.ledger.cap - self.ledger.spent_epsilon())

    def adapter_missing(self) -> bool:
        """A global adapter is configured but not loaded: the node has no DP release to serve."""
        return self.config.adapter_dir is not None and not getattr(
            self.backend, "has_global_adapter", True
        )

    def check_prompt(self, field: str, prompt: str) -> None:
        limit = self.config.limits.max_prompt_chars
        if len(prompt) > limit:
            raise unprocessable(field, f"{len(prompt)} characters; this node allows {limit}")

    def check_tokens(self, field: str, count: int) -> None:
        limit = self.config.limits.max_tokens
        if count > limit:
            raise unprocessable(field, f"{count} tokens; this node allows at most {limit}")


async def node_state(request: Request) -> NodeState:
    """The app's :class:`NodeState` (a FastAPI dependency; async: no thread-pool hop)."""
    return request.app.state.node


Node = Annotated[NodeState, Depends(node_state)]
