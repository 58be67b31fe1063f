"""Generation from the DP global model: ``/v1/inference`` and the OpenAI-style completions.

Generating from the DP-trained global model is post-processing and costs 0 ε, and every answer
says so. Consensus answers (which spend ε) are the router's to coordinate, never a node's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
from fastapi import APIRouter, HTTPException

from fedllm.serving.node.backends import Generation
from fedllm.serving.node.state import Node, NodeState
from fedllm.serving.schemas import (
    POST_PROCESSING_NOTE,
    ChatChoiceMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    InferenceRequest,
    InferenceResponse,
    Usage,
)

log = structlog.get_logger(__name__)

router = APIRouter()


@router.post("/v1/inference")
def inference(request: InferenceRequest, node: Node) -> InferenceResponse:
    if request.require_consensus:
        raise HTTPException(
            status_code=400,
            detail="consensus answers are coordinated by the router; send this request there",
        )
    started = time.perf_counter()
    generation = _generate(node, request.prompt, request.max_tokens, request.temperature)
    return InferenceResponse(
        response=generation.text,
        privacy_cost=0.0,
        remaining_budget=None,
        node_id=node.config.node_id,
        processing_time=time.perf_counter() - started,
        consensus_reached=None,
        confidence_score=None,
        privacy_note=POST_PROCESSING_NOTE,
        model_version=node.backend.model_version,
    )


@router.post("/v1/completions")
def completions(request: CompletionRequest, node: Node) -> CompletionResponse:
    generation = _openai_generation(node, request, request.prompt, "prompt")
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=request.model,
        choices=[CompletionChoice(text=generation.text, finish_reason=generation.finish_reason)],
        usage=_usage(generation),
        system_fingerprint=node.backend.model_version,
    )


@router.post("/v1/chat/completions")
def chat_completions(request: ChatCompletionRequest, node: Node) -> ChatCompletionResponse:
    generation = _openai_generation(node, request, request.prompt_text(), "messages")
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
        system_fingerprint=node.backend.model_version,
    )


def _generate(
    node: NodeState,
    prompt: str,
    max_tokens: int,
    temperature: float,
    field: str = "prompt",
    **options: Any,
) -> Generation:
    """Check the node's limits, generate (counted in ``in_flight``), log sizes but no text."""
    node.check_prompt(field, prompt)
    node.check_tokens("max_tokens", max_tokens)
    backend = node.backend
    started = time.perf_counter()
    with (
        node.busy(),
        node.tracing.span("node.generate", {"fedllm.max_tokens": max_tokens}) as span,
    ):
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


def _openai_generation(
    node: NodeState, request: CompletionRequest | ChatCompletionRequest, prompt: str, field: str
) -> Generation:
    reason = request.unsupported_reason()
    if reason is not None:
        raise HTTPException(status_code=400, detail=reason)
    generation = _generate(
        node,
        prompt,
        request.max_tokens,
        request.temperature,
        field,
        seed=request.seed,
        top_p=request.top_p if request.top_p is not None else 1.0,
    )
    return _apply_stop(generation, request.stop_sequences())


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
