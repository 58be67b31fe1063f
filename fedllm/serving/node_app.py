"""The hospital inference server's HTTP API (FastAPI): generation, consensus votes, health,
readiness.

Privacy: generating from the DP-trained global model is post-processing and costs 0 ε, and
every answer says so. A consensus vote may consult the hospital's private local adapter, so the
node never releases a vote, only a noisy ballot it draws itself from OS entropy
(:meth:`fedllm.privacy.consensus.ConsensusMechanism.ballot`), and only inside a session the
hospital's own ledger has been charged for, in advance, for every ballot the session may ask
(:func:`fedllm.privacy.consensus.ledger_event`), at a noise level no lower than the node's own
floor. Every check that can refuse a session runs before the charge. Consensus calls spend the
hospital's ε, so the configuration only enables them behind client certificates (mutual TLS),
or on loopback with an explicit insecure flag. Logs never contain prompt or reply text.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from cachetools import TTLCache
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedllm.privacy.consensus import ConsensusMechanism, ledger_event
from fedllm.privacy.node_ledger import BudgetExceededError, NodePrivacyLedger
from fedllm.serving.backends import Generation, GenerationBackend
from fedllm.serving.http_limits import install_http_guard
from fedllm.serving.node_config import NodeServerConfig
from fedllm.serving.schemas import (
    POST_PROCESSING_NOTE,
    AdapterHealth,
    CandidatesRequest,
    CandidatesResponse,
    ChatChoiceMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ConsensusOpenRequest,
    ConsensusOpenResponse,
    DecodeRequest,
    DecodeResponse,
    InferenceRequest,
    InferenceResponse,
    NodeConsensusReport,
    NodeHealth,
    NodeLimitsReport,
    Usage,
    VoteRequest,
    VoteResponse,
)
from fedllm.telemetry.tracing import TraceMiddleware, Tracing, known_route

log = structlog.get_logger(__name__)

CONSENSUS_DISABLED = "consensus disabled: no privacy ledger configured"
# Span names: the node's own routes, anything else is "other".
NODE_ROUTES = frozenset(
    {
        "/v1/health",
        "/v1/ready",
        "/v1/inference",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/consensus/candidates",
        "/v1/consensus/open",
        "/v1/consensus/vote",
        "/v1/consensus/decode",
    }
)
LEDGER_UNAVAILABLE = "privacy ledger unavailable; consensus refused (fail closed)"


def consensus_run_id(session_id: str) -> str:
    """The ledger ``run_id`` under which a consensus session's votes are charged."""
    return f"consensus:{session_id}"


@dataclass
class _Session:
    """An opened consensus session: what was charged and how many ballots it has used."""

    mechanism: ConsensusMechanism
    max_tokens: int
    votes: int = 0


def _unprocessable(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, for limits checked by the node."""
    return HTTPException(
        status_code=422, detail=[{"type": "value_error", "loc": ["body", field], "msg": message}]
    )


def error_body(status_code: int, detail: Any) -> dict[str, Any]:
    """FastAPI's ``detail`` plus OpenAI's ``error`` object, so both kinds of client read it."""
    if isinstance(detail, str):
        message = detail
    else:
        message = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg')}" for item in detail
        )
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return {"detail": detail, "error": {"message": message, "type": kind, "code": status_code}}


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with location and message only: echoing ``input`` would copy prompts into replies
    (and from there into client logs)."""
    detail = [
        {"type": item.get("type"), "loc": list(item.get("loc", ())), "msg": item.get("msg")}
        for item in error.errors()
    ]
    return JSONResponse(status_code=422, content=error_body(422, detail))


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        status_code=error.status_code,
        content=error_body(error.status_code, error.detail),
        headers=error.headers,
    )


class _NodeState:
    """Mutable server state shared by the endpoints, each part under its own lock."""

    def __init__(self, config: NodeServerConfig, ledger: NodePrivacyLedger | None) -> None:
        self.config = config
        self.ledger = ledger
        self.in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.sessions: TTLCache[str, _Session] = TTLCache(
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

    def check_prompt(self, field: str, prompt: str) -> None:
        limit = self.config.limits.max_prompt_chars
        if len(prompt) > limit:
            raise _unprocessable(field, f"{len(prompt)} characters; this node allows {limit}")

    def check_tokens(self, field: str, count: int) -> None:
        limit = self.config.limits.max_tokens
        if count > limit:
            raise _unprocessable(field, f"{count} tokens; this node allows at most {limit}")


def create_probe_app(node_app: FastAPI) -> FastAPI:
    """An app serving only ``GET /v1/ready`` of ``node_app``, for the plain-HTTP probe port.

    It reveals whether the node is ready and why not, nothing else: no generation, no consensus,
    no remaining ε, so it needs no client certificate.
    """
    app = FastAPI(title="fedllm node probes", docs_url=None, redoc_url=None, openapi_url=None)
    app.get("/v1/ready")(node_app.state.readiness)
    return app


def create_node_app(
    config: NodeServerConfig,
    backend: GenerationBackend,
    ledger: NodePrivacyLedger | None = None,
) -> FastAPI:
    """The node's FastAPI app; ``ledger`` None disables consensus (503 on open)."""
    if ledger is not None and not (
        config.authenticates_clients or config.consensus.insecure_loopback
    ):
        raise ValueError(
            "a privacy ledger enables consensus, which needs client authentication "
            "(tls.client_ca_file) or consensus.insecure_loopback"
        )
    app = FastAPI(
        title=f"fedllm node {config.node_id}",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_http_guard(app, config.limits, error_body)
    if ledger is not None and not config.authenticates_clients:
        log.warning(
            "node.consensus_unauthenticated",
            node_id=config.node_id,
            detail="consensus answers callers without client certificates "
            "(consensus.insecure_loopback): anyone on this machine can spend the hospital's ε",
        )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    state = _NodeState(config, ledger)
    app.state.node = state
    # Continues the router's trace (W3C traceparent); exported at exit by the provider.
    tracing = Tracing.from_config(config.tracing, "fedllm-node", "fedllm.node")
    app.state.tracing = tracing
    if tracing.enabled:
        app.add_middleware(TraceMiddleware, tracing=tracing, route=known_route(NODE_ROUTES))

    def run_generation(
        prompt: str, max_tokens: int, temperature: float, field: str = "prompt", **options: Any
    ) -> Generation:
        state.check_prompt(field, prompt)
        state.check_tokens("max_tokens", max_tokens)
        started = time.perf_counter()
        with state.busy(), tracing.span("node.generate", {"fedllm.max_tokens": max_tokens}) as span:
            generation = backend.generate(prompt, max_tokens, temperature, **options)
            span.set_attribute("fedllm.completion_tokens", generation.completion_tokens)
        log.info(
            "node.generate",
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            seconds=round(time.perf_counter() - started, 4),
            model_version=backend.model_version,
        )
        return generation

    def openai_generation(
        request: CompletionRequest | ChatCompletionRequest, prompt: str, field: str
    ) -> Generation:
        reason = request.unsupported_reason()
        if reason is not None:
            raise HTTPException(status_code=400, detail=reason)
        generation = run_generation(
            prompt,
            request.max_tokens,
            request.temperature,
            field,
            seed=request.seed,
            top_p=request.top_p if request.top_p is not None else 1.0,
        )
        return _apply_stop(generation, request.stop_sequences())

    def readiness() -> JSONResponse:
        """503 while a configured global adapter is not loaded (no DP release to serve) or the
        privacy ledger is unreachable, so no traffic reaches a node that would answer from the
        bare base model or fail every consensus session."""
        problems = []
        if config.adapter_dir is not None and not getattr(backend, "has_global_adapter", True):
            problems.append("the DP adapter is not loaded")
        try:
            state.remaining_epsilon()
        except Exception as error:  # a readiness probe reports a broken ledger, never raises
            log.error("node.ledger_unavailable", error=str(error))
            problems.append("privacy ledger unavailable")
        return JSONResponse(
            {"ready": not problems, "problems": problems}, status_code=503 if problems else 200
        )

    app.state.readiness = readiness
    app.get("/v1/ready")(readiness)

    @app.get("/v1/health")
    def health() -> NodeHealth:
        degraded = config.adapter_dir is not None and not getattr(
            backend, "has_global_adapter", True
        )
        try:
            remaining = state.remaining_epsilon()
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
            in_flight=state.in_flight,
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
            if ledger is None
            else NodeConsensusReport(
                min_noise_multiplier=config.consensus.min_noise_multiplier,
                client_authenticated=config.authenticates_clients,
            ),
        )

    @app.post("/v1/inference")
    def inference(request: InferenceRequest) -> InferenceResponse:
        if request.require_consensus:
            raise HTTPException(
                status_code=400,
                detail="consensus answers are coordinated by the router; send this request there",
            )
        started = time.perf_counter()
        generation = run_generation(request.prompt, request.max_tokens, request.temperature)
        return InferenceResponse(
            response=generation.text,
            privacy_cost=0.0,
            remaining_budget=None,
            node_id=config.node_id,
            processing_time=time.perf_counter() - started,
            consensus_reached=None,
            confidence_score=None,
            privacy_note=POST_PROCESSING_NOTE,
            model_version=backend.model_version,
        )

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> CompletionResponse:
        generation = openai_generation(request, request.prompt, "prompt")
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            choices=[
                CompletionChoice(text=generation.text, finish_reason=generation.finish_reason)
            ],
            usage=_usage(generation),
            system_fingerprint=backend.model_version,
        )

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatCompletionRequest) -> ChatCompletionResponse:
        generation = openai_generation(request, request.prompt_text(), "messages")
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            choices=[
                ChatCompletionChoice(
                    message=ChatChoiceMessage(content=generation.text),
                    finish_reason=generation.finish_reason,
                )
            ],
            usage=_usage(generation),
            system_fingerprint=backend.model_version,
        )

    @app.post("/v1/consensus/candidates")
    def candidates(request: CandidatesRequest) -> CandidatesResponse:
        state.check_prompt("prompt", request.prompt)
        state.check_tokens("token_ids", len(request.token_ids))
        with state.busy():
            try:
                ids = backend.candidates(request.prompt, request.token_ids, request.k)
            except ValueError as error:
                raise _unprocessable("token_ids", str(error)) from None
        return CandidatesResponse(candidates=ids, model_version=backend.model_version)

    @app.post("/v1/consensus/open")
    def open_session(request: ConsensusOpenRequest) -> ConsensusOpenResponse:
        if ledger is None:
            raise HTTPException(status_code=503, detail=CONSENSUS_DISABLED)
        # every check that can refuse the session runs before the ledger is charged
        state.check_prompt("prompt", request.prompt)
        state.check_tokens("max_tokens", request.max_tokens)
        floor = config.consensus.min_noise_multiplier
        if request.noise_multiplier < floor:
            raise _unprocessable(
                "noise_multiplier",
                f"{request.noise_multiplier:g} is below this hospital's floor of {floor:g}",
            )
        mechanism = ConsensusMechanism.from_noise_multiplier(request.noise_multiplier)
        with state.open_lock:
            with state.sessions_lock:
                existing = state.sessions.get(request.session_id)
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
                with tracing.span("node.consensus.charge", tokens):
                    _charge(ledger, request)
                with state.sessions_lock:
                    state.sessions[request.session_id] = _Session(mechanism, request.max_tokens)
                charged = True
        log.info(
            "node.consensus_open",
            session=request.session_id,
            charged=charged,
            noise_multiplier=request.noise_multiplier,
            max_tokens=request.max_tokens,
        )
        try:
            remaining = state.remaining_epsilon()
        except Exception as error:  # the charge is recorded; only the report is unavailable
            log.error("node.ledger_unavailable", error=str(error))
            remaining = None
        return ConsensusOpenResponse(
            node_id=config.node_id,
            hospital_id=config.hospital_id,
            charged=charged,
            epsilon=mechanism.epsilon_cost(request.max_tokens, ledger.delta, ledger.accountant),
            remaining_epsilon=remaining,
        )

    @app.post("/v1/consensus/vote")
    def vote(request: VoteRequest) -> VoteResponse:
        state.check_prompt("prompt", request.prompt)
        with state.sessions_lock:
            session = state.sessions.get(request.session_id)
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
        with tracing.span("node.consensus.ballot", {"fedllm.candidates": len(request.candidates)}):
            with state.busy():
                try:
                    index = backend.vote(request.prompt, request.token_ids, request.candidates)
                except ValueError as error:
                    raise _unprocessable("candidates", str(error)) from None
            ballot = state.ballot(session.mechanism, index, len(request.candidates))
        return VoteResponse(node_id=config.node_id, ballot=ballot)

    @app.post("/v1/consensus/decode")
    def decode(request: DecodeRequest) -> DecodeResponse:
        try:
            text = backend.decode(request.token_ids)
        except ValueError as error:
            raise _unprocessable("token_ids", str(error)) from None
        return DecodeResponse(text=text, eos_token_id=backend.eos_token_id)

    return app


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


def _usage(generation: Generation) -> Usage:
    return Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=generation.prompt_tokens + generation.completion_tokens,
    )


def _apply_stop(generation: Generation, stops: list[str]) -> Generation:
    """Cut the text at the first stop sequence (OpenAI semantics: the stop is not returned)."""
    cut = min((i for i in (generation.text.find(s) for s in stops) if i >= 0), default=-1)
    if cut < 0:
        return generation
    return Generation(
        text=generation.text[:cut],
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        finish_reason="stop",
    )
