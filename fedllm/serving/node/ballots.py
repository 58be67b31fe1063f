"""The hospital's side of a consensus answer: candidates, sessions charged in advance, ballots.

A consensus vote may consult the hospital's private local adapter, so the node never releases a
vote, only a noisy ballot it draws itself from OS entropy
(:meth:`fedllm.privacy.consensus.ConsensusMechanism.ballot`), and only inside a session the
hospital's own ledger has been charged for, in advance, for every ballot the session may ask
(:func:`fedllm.privacy.consensus.ledger_event`), at a noise level no lower than the node's own
floor. Every check that can refuse a session runs before the charge.
"""

from __future__ import annotations

import structlog
from fastapi import APIRouter, HTTPException

from fedllm.privacy.consensus import ConsensusMechanism, ledger_event
from fedllm.privacy.node_ledger import BudgetExceededError, NodePrivacyLedger
from fedllm.serving.node.state import Node, Session, unprocessable
from fedllm.serving.schemas import (
    CandidatesRequest,
    CandidatesResponse,
    ConsensusOpenRequest,
    ConsensusOpenResponse,
    DecodeRequest,
    DecodeResponse,
    VoteRequest,
    VoteResponse,
)

log = structlog.get_logger(__name__)

CONSENSUS_DISABLED = "consensus disabled: no privacy ledger configured"
LEDGER_UNAVAILABLE = "privacy ledger unavailable; consensus refused (fail closed)"

router = APIRouter()


def consensus_run_id(session_id: str) -> str:
    """The ledger ``run_id`` under which a consensus session's votes are charged."""
    return f"consensus:{session_id}"


@router.post("/v1/consensus/candidates")
def candidates(request: CandidatesRequest, node: Node) -> CandidatesResponse:
    node.check_prompt("prompt", request.prompt)
    node.check_tokens("token_ids", len(request.token_ids))
    with node.busy():
        try:
            ids = node.backend.candidates(request.prompt, request.token_ids, request.k)
        except ValueError as error:
            raise unprocessable("token_ids", str(error)) from None
    return CandidatesResponse(candidates=ids, model_version=node.backend.model_version)


@router.post("/v1/consensus/open")
def open_session(request: ConsensusOpenRequest, node: Node) -> ConsensusOpenResponse:
    ledger = node.ledger
    if ledger is None:
        raise HTTPException(status_code=503, detail=CONSENSUS_DISABLED)
    # every check that can refuse the session runs before the ledger is charged
    node.check_prompt("prompt", request.prompt)
    node.check_tokens("max_tokens", request.max_tokens)
    floor = node.config.consensus.min_noise_multiplier
    if request.noise_multiplier < floor:
        raise unprocessable(
            "noise_multiplier",
            f"{request.noise_multiplier:g} is below this hospital's floor of {floor:g}",
        )
    mechanism = ConsensusMechanism.from_noise_multiplier(request.noise_multiplier)
    with node.open_lock:
        with node.sessions_lock:
            existing = node.sessions.get(request.session_id)
        if existing is not None:
            if (existing.mechanism, existing.max_tokens) != (mechanism, request.max_tokens):
                raise HTTPException(
                    status_code=409,
                    detail=f"session {request.session_id!r} is already open with "
                    "different noise_multiplier or max_tokens",
                )
            charged = False
        else:
            tokens = {"fedllm.max_tokens": request.max_tokens}
            with node.tracing.span("node.consensus.charge", tokens):
                _charge(ledger, request)
            with node.sessions_lock:
                node.sessions[request.session_id] = Session(mechanism, request.max_tokens)
            charged = True
    log.info(
        "node.consensus_open",
        session=request.session_id,
        charged=charged,
        noise_multiplier=request.noise_multiplier,
        max_tokens=request.max_tokens,
    )
    try:
        remaining = node.remaining_epsilon()
    except Exception as error:  # the charge is recorded; only the report is unavailable
        log.error("node.ledger_unavailable", error=str(error))
        remaining = None
    return ConsensusOpenResponse(
        node_id=node.config.node_id,
        hospital_id=node.config.hospital_id,
        charged=charged,
        epsilon=mechanism.epsilon_cost(request.max_tokens, ledger.delta, ledger.accountant),
        remaining_epsilon=remaining,
    )


@router.post("/v1/consensus/vote")
def vote(request: VoteRequest, node: Node) -> VoteResponse:
    node.check_prompt("prompt", request.prompt)
    with node.sessions_lock:
        session = node.sessions.get(request.session_id)
        if session is None:
            raise HTTPException(
                status_code=404,
                detail=f"unknown or expired consensus session {request.session_id!r}",
            )
        if session.votes >= session.max_tokens:
            raise HTTPException(
                status_code=409,
                detail=f"session {request.session_id!r} has used all "
                f"{session.max_tokens} ballots it was charged for",
            )
        session.votes += 1
    with node.tracing.span("node.consensus.ballot", {"fedllm.candidates": len(request.candidates)}):
        with node.busy():
            try:
                index = node.backend.vote(request.prompt, request.token_ids, request.candidates)
            except ValueError as error:
                raise unprocessable("candidates", str(error)) from None
        ballot = node.ballot(session.mechanism, index, len(request.candidates))
    return VoteResponse(node_id=node.config.node_id, ballot=ballot)


@router.post("/v1/consensus/decode")
def decode(request: DecodeRequest, node: Node) -> DecodeResponse:
    try:
        text = node.backend.decode(request.token_ids)
    except ValueError as error:
        raise unprocessable("token_ids", str(error)) from None
    return DecodeResponse(text=text, eos_token_id=node.backend.eos_token_id)


def _charge(ledger: NodePrivacyLedger, request: ConsensusOpenRequest) -> None:
    """Charge the session's votes before any is cast: 409 past the cap, 503 if unreachable."""
    event = ledger_event(request.noise_multiplier, request.max_tokens)
    try:
        ledger.charge([event], round_id=0, run_id=consensus_run_id(request.session_id))
    except BudgetExceededError as error:
        log.info("node.consensus_refused", session=request.session_id)
        raise HTTPException(status_code=409, detail=str(error)) from None
    except Exception as error:  # any ledger failure refuses the votes: fail closed
        log.error("node.ledger_unavailable", error=str(error))
        raise HTTPException(status_code=503, detail=LEDGER_UNAVAILABLE) from None
