"""The router's side of cross-hospital consensus: it adds up the hospitals' noisy ballots.

Protocol for one answer (see fedllm.privacy.consensus for why it is private):

0. Before anything is charged, `choose_voters` keeps the healthy nodes that offer consensus at
   the router's noise level and accept this prompt and ``max_tokens``, one node per hospital
   (a hospital's ledger is charged once per answer, and its ballots are counted once).
1. A fresh session id; ``/v1/consensus/open`` on every voter, concurrently. Each node checks the
   request against its own floor and limits, then charges its hospital ledger for
   ``max_tokens`` ballots *before* any ballot; a node that refuses (4xx) or fails is dropped.
2. Per token: the public top-k candidates of the DP global model from one node, the noisy
   ballot of every voter (concurrently), then ``ConsensusMechanism.tally``; stop at EOS or after
   ``max_tokens``.
3. The chosen tokens are decoded by one node.

The router never sees a raw vote: every ballot is noised by the hospital that cast it. Whether
the user's quota is committed or refunded after a failure is decided by the caller from
``votes_cast``; ``charged`` names every hospital ledger that was charged, for the audit log.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from fedllm.privacy.consensus import ConsensusMechanism, TokenDecision, summarise
from fedllm.serving.router.node_pool import NodeCallError, NodePool, NodeState

log = structlog.get_logger(__name__)


class ConsensusError(Exception):
    """Consensus could not finish; ``votes_cast`` says whether any ballot was used."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        *,
        charged: Sequence[ChargedLedger] = (),
        votes_cast: bool = False,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.charged = list(charged)
        self.votes_cast = votes_cast


@dataclass(frozen=True)
class ChargedLedger:
    """One hospital ledger a consensus answer charged: who, through which node, how much."""

    hospital_id: str
    node_id: str
    epsilon: float

    def as_audit(self) -> dict[str, Any]:
        """The entry's form in the audit log."""
        return {"hospital_id": self.hospital_id, "node_id": self.node_id, "epsilon": self.epsilon}


@dataclass
class ConsensusOutcome:
    """A finished consensus answer."""

    text: str
    participants: list[str]
    consensus_reached: bool
    confidence_score: float
    tokens: int
    model_version: str | None
    charged: list[ChargedLedger]
    refused_nodes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConsensusSettings:
    """The router's consensus parameters."""

    mechanism: ConsensusMechanism
    top_k: int
    min_nodes: int
    max_nodes: int | None = None


@dataclass(frozen=True)
class VoterChoice:
    """The nodes that may vote on one answer, and why each other healthy node may not."""

    voters: list[NodeState]
    excluded: dict[str, str]
    limit_exclusions: int

    def refusal(self, settings: ConsensusSettings) -> tuple[int, str] | None:
        """(status, detail) when too few hospitals can vote; None when enough can.

        422 when the request itself is what the hospitals refuse (prompt or max_tokens over
        their limits): the user can fix it. 503 otherwise.
        """
        if len(self.voters) >= settings.min_nodes:
            return None
        reasons = "; ".join(f"{node}: {why}" for node, why in sorted(self.excluded.items()))
        status = 422 if self.limit_exclusions else 503
        detail = (
            f"consensus needs at least {settings.min_nodes} hospitals; "
            f"{len(self.voters)} can take part"
        )
        return status, f"{detail} ({reasons})" if reasons else detail


def choose_voters(
    nodes: Sequence[NodeState], settings: ConsensusSettings, prompt: str, max_tokens: int
) -> VoterChoice:
    """One node per hospital, among `nodes` (in policy order), able to vote on this answer.

    Runs before the user's quota or any ledger is touched, from what the nodes' health
    reports say, so a request that cannot succeed is refused without spending anything.
    """
    voters: list[NodeState] = []
    excluded: dict[str, str] = {}
    limit_exclusions = 0
    hospitals: dict[str, str] = {}
    noise = settings.mechanism.noise_multiplier
    limit = settings.max_nodes or math.inf
    for node in nodes:
        reason = None
        if node.hospital_id is None:
            reason = "reports no hospital"
        elif node.consensus_floor is None:
            reason = "offers no consensus (no ledger)"
        elif node.consensus_floor > noise:
            reason = (
                f"requires a noise multiplier of at least {node.consensus_floor:g}; "
                f"the router asks {noise:.6g}"
            )
        elif node.max_prompt_chars is not None and len(prompt) > node.max_prompt_chars:
            reason = f"accepts prompts of at most {node.max_prompt_chars} characters"
            limit_exclusions += 1
        elif node.max_tokens is not None and max_tokens > node.max_tokens:
            reason = f"accepts max_tokens of at most {node.max_tokens}"
            limit_exclusions += 1
        elif node.hospital_id in hospitals:
            reason = (
                f"same hospital {node.hospital_id!r} as node {hospitals[node.hospital_id]!r} "
                "(one ballot per hospital)"
            )
        elif len(voters) >= limit:
            reason = "max_nodes reached"
        if reason is not None:
            excluded[node.node_id] = reason
            continue
        hospitals[str(node.hospital_id)] = node.node_id
        voters.append(node)
    return VoterChoice(voters, excluded, limit_exclusions)


class ConsensusRun:
    """One consensus answer among voters already chosen by `choose_voters`."""

    def __init__(
        self, pool: NodePool, settings: ConsensusSettings, voters: Sequence[NodeState]
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._invited = list(voters)
        self.session_id = secrets.token_hex(16)
        self.charged: list[ChargedLedger] = []
        self.refused_nodes: list[str] = []
        self._refusals: dict[str, int] = {}
        self.votes_cast = False

    def _fail(self, status_code: int, detail: str) -> ConsensusError:
        return ConsensusError(status_code, detail, charged=self.charged, votes_cast=self.votes_cast)

    async def run(self, prompt: str, max_tokens: int) -> ConsensusOutcome:
        """Open, collect ballots token by token, decode."""
        min_nodes = self._settings.min_nodes
        tracing = self._pool.tracing
        with tracing.span("consensus.open", {"fedllm.invited": len(self._invited)}) as span:
            voters = await self._open(prompt, max_tokens)
            span.set_attribute("fedllm.joined", len(voters))
        if len(voters) < min_nodes:
            raise self._fail(
                503,
                f"consensus needs at least {min_nodes} hospitals; only {len(voters)} could take "
                f"part ({self._refusal_summary()})",
            )
        token_ids: list[int] = []
        decisions: list[TokenDecision] = []
        model_version: str | None = None
        eos = await self._eos_token_id(voters)
        for position in range(max_tokens):
            with tracing.span("consensus.ballot_round", {"fedllm.round": position}):
                candidates, model_version = await self._candidates(voters, prompt, token_ids)
                ballots, voters = await self._ballots(voters, prompt, token_ids, candidates)
                with tracing.span("consensus.tally", {"fedllm.ballots": len(ballots)}):
                    decision = self._settings.mechanism.tally(ballots)
            decisions.append(decision)
            token = candidates[decision.index]
            if token == eos:
                break
            token_ids.append(token)
        with tracing.span("consensus.decode", {"fedllm.tokens": len(token_ids)}):
            text = await self._decode(voters, token_ids)
        reached, confidence = summarise(decisions)
        return ConsensusOutcome(
            text=text,
            participants=[node.node_id for node in voters],
            consensus_reached=reached,
            confidence_score=confidence,
            tokens=len(token_ids),
            model_version=model_version,
            charged=list(self.charged),
            refused_nodes=list(self.refused_nodes),
        )

    def _refusal_summary(self) -> str:
        """Why invited nodes did not join, by cause, e.g. '1 hospital privacy budget exhausted'."""
        if not self._refusals:
            return "no node refused"
        return ", ".join(f"{count} {why}" for why, count in sorted(self._refusals.items()))

    def _refused(self, node: NodeState, why: str) -> None:
        self.refused_nodes.append(node.node_id)
        self._refusals[why] = self._refusals.get(why, 0) + 1

    async def _open(self, prompt: str, max_tokens: int) -> list[NodeState]:
        payload = {
            "session_id": self.session_id,
            "prompt": prompt,
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
                self._refused(node, f"did not answer ({result.reason})")
                continue
            if isinstance(result, BaseException):
                raise result
            if result.status_code != 200:
                why = (
                    "hospital privacy budget exhausted"
                    if result.status_code == 409
                    else f"refused with HTTP {result.status_code}"
                )
                log.info("consensus_open_refused", node_id=node.node_id, status=result.status_code)
                self._refused(node, why)
                continue
            body = result.json()
            charged = ChargedLedger(
                hospital_id=str(body.get("hospital_id")),
                node_id=node.node_id,
                epsilon=float(body.get("epsilon", math.nan)),
            )
            self.charged.append(charged)
            if charged.hospital_id != node.hospital_id:
                # charged, but its ballots cannot be counted as the hospital health reported
                log.error("consensus_hospital_mismatch", node_id=node.node_id)
                self._refused(node, "answered for another hospital")
                continue
            joined.append(node)
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

    async def _ballots(
        self,
        voters: list[NodeState],
        prompt: str,
        token_ids: list[int],
        candidates: list[int],
    ) -> tuple[list[list[float]], list[NodeState]]:
        payload = {
            "session_id": self.session_id,
            "prompt": prompt,
            "token_ids": token_ids,
            "candidates": candidates,
        }
        # From here on ballots may reach the router: the caller must charge the quota.
        self.votes_cast = True
        results = await asyncio.gather(
            *(self._pool.call(node, "/v1/consensus/vote", payload) for node in voters),
            return_exceptions=True,
        )
        ballots: list[list[float]] = []
        still: list[NodeState] = []
        for node, result in zip(voters, results, strict=True):
            if isinstance(result, NodeCallError):
                continue
            if isinstance(result, BaseException):
                raise result
            if result.status_code != 200:
                log.warning("consensus_vote_refused", node_id=node.node_id)
                continue
            ballot = _valid_ballot(result.json().get("ballot"), len(candidates))
            if ballot is None:
                log.warning("consensus_bad_ballot", node_id=node.node_id)
                continue
            ballots.append(ballot)
            still.append(node)
        if len(ballots) < self._settings.min_nodes:
            raise self._fail(
                503,
                f"consensus lost its quorum: {len(ballots)} of {self._settings.min_nodes} "
                "hospitals still voting",
            )
        return ballots, still

    async def _decode(self, voters: Sequence[NodeState], token_ids: list[int]) -> str:
        body = await self._first_answer(voters, "/v1/consensus/decode", {"token_ids": token_ids})
        return str(body["text"])


def _valid_ballot(value: object, size: int) -> list[float] | None:
    """`value` as a ballot over `size` candidates, or None if it is not one."""
    if not isinstance(value, list) or len(value) != size:
        return None
    ballot: list[float] = []
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, int | float):
            return None
        if not math.isfinite(entry):
            return None
        ballot.append(float(entry))
    return ballot
