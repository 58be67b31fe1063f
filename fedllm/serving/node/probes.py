"""``/v1/health`` and ``/v1/ready``: what the router and an orchestrator poll.

Readiness is 503 while a configured global adapter is not loaded or the privacy ledger is
unreachable; health reports the node's state, remaining ε included. Neither ever raises on a
broken ledger: reporting it is their job.
"""

from __future__ import annotations

import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from fedllm.serving.node.state import Node
from fedllm.serving.schemas import (
    AdapterHealth,
    NodeConsensusReport,
    NodeHealth,
    NodeLimitsReport,
)

log = structlog.get_logger(__name__)

router = APIRouter()


@router.get("/v1/ready")
def readiness(node: Node) -> JSONResponse:
    """503 while a configured global adapter is not loaded (no DP release to serve) or the
    privacy ledger is unreachable, so no traffic reaches a node that would answer from the
    bare base model or fail every consensus session."""
    problems = []
    if node.adapter_missing():
        problems.append("the DP adapter is not loaded")
    try:
        node.remaining_epsilon()
    except Exception as error:  # a readiness probe reports a broken ledger, never raises
        log.error("node.ledger_unavailable", error=str(error))
        problems.append("privacy ledger unavailable")
    return JSONResponse(
        {"ready": not problems, "problems": problems}, status_code=503 if problems else 200
    )


@router.get("/v1/health")
def health(node: Node) -> NodeHealth:
    config, backend = node.config, node.backend
    degraded = node.adapter_missing()
    try:
        remaining = node.remaining_epsilon()
    except Exception as error:  # a health probe reports a broken ledger, never raises
        log.error("node.ledger_unavailable", error=str(error))
        remaining, degraded = None, True
    served = getattr(backend, "served", None)  # ModelBackend: what it accepted, and why not
    return NodeHealth(
        status="degraded" if degraded else "ok",
        node_id=config.node_id,
        hospital_id=config.hospital_id,
        model_version=backend.model_version,
        specialisations=config.specialisations,
        in_flight=node.in_flight,
        remaining_epsilon=remaining,
        adapter=None
        if served is None
        else AdapterHealth(
            version=served.version,
            dp_record=None if served.dp_record is None else served.dp_record.summary(),
        ),
        adapter_issue=getattr(backend, "adapter_issue", None),
        limits=NodeLimitsReport(
            max_prompt_chars=config.limits.max_prompt_chars,
            max_tokens=config.limits.max_tokens,
        ),
        consensus=None
        if node.ledger is None
        else NodeConsensusReport(
            min_noise_multiplier=config.consensus.min_noise_multiplier,
            client_authenticated=config.authenticates_clients,
        ),
    )
