"""The router's side of cross-hospital consensus: GNMax over the hospitals' local votes.

Protocol for one answer (see fedllm.privacy.consensus for why it is private):

1. A fresh session id; ``/v1/consensus/open`` on every participating node, concurrently. Each
   node charges its own hospital ledger for ``max_tokens`` token releases *before* any vote;
   a node answering 409 (its ε cap would be exceeded) or failing is dropped from the session.
2. Per token: the public top-k candidates of the DP global model from one node, the local
   vote of every node (concurrently), then ``ConsensusMechanism.decide`` with noise from an
   OS-seeded generator; stop at EOS or after ``max_tokens``.
3. The chosen tokens are decoded by one node.

The router sees raw votes but only ever releases noisy decisions. Whether the user's quota is
committed or refunded after a failure is decided by the caller from ``charged_nodes``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from fedllm.privacy.consensus import ConsensusMechanism, TokenDecision, summarise
from fedllm.serving.router.node_pool import NodeCallError, NodePool, NodeState

log = structlog.get_logger(__name__)


class ConsensusError(Exception):
    """Consensus could not finish; ``votes_cast`` says whether any private vote was used."""

    def __init__(
        self, status_code: int, detail: str, *, charged_nodes: Sequence[str], votes_cast: bool
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.charged_nodes = list(charged_nodes)
        self.votes_cast = votes_cast


@dataclass
class ConsensusOutcome:
    """A finished consensus answer."""

    text: str
    participants: list[str]
    consensus_reached: bool
    confidence_score: float
    tokens: int
    model_version: str | None
    refused_nodes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConsensusSettings:
    """The router's consensus parameters."""

    mechanism: ConsensusMechanism
    top_k: int
    min_nodes: int
    max_nodes: int | None = None


def new_rng() -> np.random.Generator:
    """A generator seeded from OS entropy: the noise must be unpredictable to everyone."""
    return np.random.default_rng(secrets.randbits(128))


class ConsensusRun:
    """One consensus answer across the nodes it is given (already ordered by policy)."""

    def __init__(
        self,
        pool: NodePool,
        settings: ConsensusSettings,
        nodes: Sequence[NodeState],
        *,
        rng: np.random.Generator | None = None,
    ) -> None:
        self._pool = pool
        self._settings = settings
        limit = settings.max_nodes or len(nodes)
        self._invited = list(nodes)[:limit]
        self._rng = rng or new_rng()
        self.session_id = secrets.token_hex(16)
        self.charged_nodes: list[str] = []
        self.refused_nodes: list[str] = []
        self.votes_cast = False

    def _fail(self, status_code: int, detail: str) -> ConsensusError:
        return ConsensusError(
            status_code,
            detail,
            charged_nodes=self.charged_nodes,
            votes_cast=self.votes_cast,
        )

    async def run(self, prompt: str, max_tokens: int) -> ConsensusOutcome:
        """Open, vote token by token, decode."""
        min_nodes = self._settings.min_nodes
        if len(self._invited) < min_nodes:
            raise self._fail(
                503,
                f"consensus needs at least {min_nodes} healthy hospitals; "
                f"{len(self._invited)} available",
            )
        voters = await self._open(max_tokens)
        if len(voters) < min_nodes:
            raise self._fail(
                503,
                f"consensus needs at least {min_nodes} hospitals; only {len(voters)} could take "
                f"part ({len(self.refused_nodes)} refused: hospital privacy budget exhausted)",
            )
        token_ids: list[int] = []
        decisions: list[TokenDecision] = []
        model_version: str | None = None
        eos = await self._eos_token_id(voters)
        for _ in range(max_tokens):
            candidates, model_version = await self._candidates(voters, prompt, token_ids)
            votes, voters = await self._votes(voters, prompt, token_ids, candidates)
            decision = self._settings.mechanism.decide(votes, len(candidates), self._rng)
            decisions.append(decision)
            token = candidates[decision.index]
            if token == eos:
                break
            token_ids.append(token)
        text = await self._decode(voters, token_ids)
        reached, confidence = summarise(decisions)
        return ConsensusOutcome(
            text=text,
            participants=[node.node_id for node in voters],
            consensus_reached=reached,
            confidence_score=confidence,
            tokens=len(token_ids),
            model_version=model_version,
            refused_nodes=list(self.refused_nodes),
        )

    async def _open(self, max_tokens: int) -> list[NodeState]:
        payload = {
            "session_id": self.session_id,
            "noise_multiplier": self._settings.mechanism.noise_multiplier,
            "max_tokens": max_tokens,
        }
        results = await asyncio.gather(
            *(self._pool.call(node, "/v1/consensus/open", payload) for node in self._invited),
            return_exceptions=True,
        )
        joined: list[NodeState] = []
        for node, result in zip(self._invited, results, strict=True):
            if isinstance(result, NodeCallError):
                log.warning("consensus_open_failed", node_id=node.node_id, reason=result.reason)
                continue
            if isinstance(result, BaseException):
                raise result
            if result.status_code == 200:
                self.charged_nodes.append(node.node_id)
                joined.append(node)
            else:
                self.refused_nodes.append(node.node_id)
                log.info("consensus_open_refused", node_id=node.node_id, status=result.status_code)
        return joined

    async def _first_answer(
        self, nodes: Sequence[NodeState], path: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        """POST to the first node that answers 200 (public computations: any node will do)."""
        for node in nodes:
            try:
                response = await self._pool.call(node, path, payload)
            except NodeCallError:
                continue
            if response.status_code == 200:
                return response.json()
            log.warning("consensus_call_refused", node_id=node.node_id, path=path)
        raise self._fail(502, f"no hospital answered {path}")

    async def _eos_token_id(self, voters: Sequence[NodeState]) -> int:
        body = await self._first_answer(voters, "/v1/consensus/decode", {"token_ids": []})
        return int(body["eos_token_id"])

    async def _candidates(
        self, voters: Sequence[NodeState], prompt: str, token_ids: list[int]
    ) -> tuple[list[int], str | None]:
        payload = {"prompt": prompt, "token_ids": token_ids, "k": self._settings.top_k}
        body = await self._first_answer(voters, "/v1/consensus/candidates", payload)
        candidates = [int(token) for token in body["candidates"]]
        if not candidates:
            raise self._fail(502, "the global model offered no candidate tokens")
        return candidates, body.get("model_version")

    async def _votes(
        self,
        voters: list[NodeState],
        prompt: str,
        token_ids: list[int],
        candidates: list[int],
    ) -> tuple[list[int], list[NodeState]]:
        payload = {
            "session_id": self.session_id,
            "prompt": prompt,
            "token_ids": token_ids,
            "candidates": candidates,
        }
        # From here on private votes may reach the router: the caller must charge the quota.
        self.votes_cast = True
        results = await asyncio.gather(
            *(self._pool.call(node, "/v1/consensus/vote", payload) for node in voters),
            return_exceptions=True,
        )
        votes: list[int] = []
        still: list[NodeState] = []
        for node, result in zip(voters, results, strict=True):
            if isinstance(result, NodeCallError):
                continue
            if isinstance(result, BaseException):
                raise result
            if result.status_code != 200:
                log.warning("consensus_vote_refused", node_id=node.node_id)
                continue
            vote = result.json().get("vote")
            if isinstance(vote, int) and 0 <= vote < len(candidates):
                votes.append(vote)
                still.append(node)
        if len(votes) < self._settings.min_nodes:
            raise self._fail(
                503,
                f"consensus lost its quorum: {len(votes)} of {self._settings.min_nodes} "
                "hospitals still voting",
            )
        return votes, still

    async def _decode(self, voters: Sequence[NodeState], token_ids: list[int]) -> str:
        body = await self._first_answer(voters, "/v1/consensus/decode", {"token_ids": token_ids})
        return str(body["text"])
