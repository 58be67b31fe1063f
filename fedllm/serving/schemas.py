"""The HTTP API contract shared by hospital nodes and the router: pydantic request/response models.

Validation lives here, in the models, so that every server built on them rejects the same bad
input the same way: as HTTP 422 with a message naming the field, never as a 500 from deep inside
generation. The limits below are hard ceilings of the protocol; a node may configure stricter
ones (see `fedllm.serving.node.config.NodeLimits`).

The OpenAI-shaped models follow the public `/v1/completions` and `/v1/chat/completions` API
closely enough for the official `openai` client; fields of that API we do not implement (e.g.
``logit_bias``) are ignored as unknown keys rather than rejected, so ordinary clients that send
their defaults keep working. fedllm's own models forbid unknown keys.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_PROMPT_CHARS = 32_000
MAX_TOKENS_LIMIT = 2048
MAX_CANDIDATES = 64
MAX_PRIVACY_BUDGET = 100.0
MAX_STOP_SEQUENCES = 4
MAX_NAME_CHARS = 256
DEFAULT_MAX_TOKENS = 64
OPENAI_DEFAULT_MAX_TOKENS = 16
ALLOWED_CONTROL_CHARACTERS = frozenset("\n\t\r")

POST_PROCESSING_NOTE = (
    "post-processing of the DP-trained global model: 0 ε "
    "(the hospitals' training records are protected by the model's DP guarantee)"
)


def check_text(value: str) -> str:
    """Reject control characters other than newline, tab and carriage return.

    Control characters (NUL, terminal escape sequences) have no place in clinical text and are
    a classic vector for log and terminal injection downstream.
    """
    for position, char in enumerate(value):
        if char not in ALLOWED_CONTROL_CHARACTERS and unicodedata.category(char) == "Cc":
            raise ValueError(
                f"control character U+{ord(char):04X} at position {position} is not allowed "
                r"(only \n, \t and \r are)"
            )
    return value


class _ApiModel(BaseModel):
    """fedllm's own API bodies: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")


class _OpenAIModel(BaseModel):
    """OpenAI-shaped bodies: unknown (unsupported) OpenAI options are ignored."""

    model_config = ConfigDict(extra="ignore")


PromptText = Annotated[
    str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(check_text)
]
SessionId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
TokenIdList = Annotated[
    list[Annotated[int, Field(ge=0, strict=True)]], Field(max_length=MAX_TOKENS_LIMIT)
]
# Request fields are strict: ``max_tokens: true`` or ``require_consensus: "yes"`` are type
# errors, not 1 and True. Floats accept any JSON number (``temperature: 1``) but no strings.
StrictBool = Annotated[bool, Field(strict=True)]


# --- fedllm inference -------------------------------------------------------------------------


class InferenceRequest(_ApiModel):
    """POST /v1/inference: one prompt, optionally answered by cross-hospital consensus."""

    prompt: PromptText
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False, strict=True)
    privacy_budget: float | None = Field(
        None, ge=0.0, le=MAX_PRIVACY_BUDGET, allow_inf_nan=False, strict=True
    )
    require_consensus: StrictBool = False
    priority: Literal["low", "normal", "high"] = "normal"
    department: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS)


class InferenceResponse(_ApiModel):
    """The answer, what it cost in ε and why (``privacy_note``)."""

    response: str
    privacy_cost: float
    remaining_budget: float | None = None
    node_id: str
    processing_time: float
    consensus_reached: bool | None = None
    confidence_score: float | None = None
    privacy_note: str
    model_version: str | None = None


# --- OpenAI-compatible completions ------------------------------------------------------------


class Usage(_OpenAIModel):
    """Token counts, as OpenAI reports them."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _SamplingOptions(_OpenAIModel):
    """Options common to completions and chat completions."""

    model: str = Field("fedllm", max_length=MAX_NAME_CHARS)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, strict=True)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)
    n: int = Field(1, ge=1, strict=True)
    stream: StrictBool = False
    stop: str | list[str] | None = None
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)
    seed: int | None = Field(None, strict=True)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        sequences = [value] if isinstance(value, str) else value or []
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        for sequence in sequences:
            if not sequence:
                raise ValueError("stop sequences must be non-empty")
            check_text(sequence)
        return value

    def stop_sequences(self) -> list[str]:
        """``stop`` as a list (OpenAI accepts a string or a list)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported_reason(self) -> str | None:
        """Why a valid request asks for something this API does not do (HTTP 400), or None."""
        if self.n != 1:
            return f"n={self.n} is not supported; only n=1"
        if self.stream:
            return "stream=true is not supported"
        return None


class CompletionRequest(_SamplingOptions):
    """POST /v1/completions."""

    prompt: PromptText
    max_tokens: int = Field(OPENAI_DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT, strict=True)


class CompletionChoice(_OpenAIModel):
    """One generated text."""

    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionResponse(_OpenAIModel):
    """The OpenAI ``text_completion`` object, plus fedllm's privacy accounting of the answer."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    privacy_cost: float = 0.0
    privacy_note: str = POST_PROCESSING_NOTE


class ChatMessage(_OpenAIModel):
    """One chat turn; content is plain text."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(check_text)]


class ChatCompletionRequest(_SamplingOptions):
    """POST /v1/chat/completions. ``max_completion_tokens`` (newer clients) wins over
    ``max_tokens``; either way the limit is read from ``max_tokens`` after validation."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, strict=True)

    @model_validator(mode="after")
    def _merge_limits(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        total = sum(len(message.content) for message in self.messages)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(
                f"messages hold {total} characters in total; at most {MAX_PROMPT_CHARS} allowed"
            )
        return self

    def prompt_text(self) -> str:
        """The conversation as one prompt: ``role: content`` lines, then ``assistant:``.

        A plain-text rendering rather than a model-specific chat template, so every node and the
        router (which scores consensus candidates on the same prompt) agree on it exactly.
        """
        lines = [f"{message.role}: {message.content}" for message in self.messages]
        return "\n".join([*lines, "assistant:"])


class ChatChoiceMessage(_OpenAIModel):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(_OpenAIModel):
    """One generated reply."""

    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(_OpenAIModel):
    """The OpenAI ``chat.completion`` object, plus fedllm's privacy accounting of the answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    privacy_cost: float = 0.0
    privacy_note: str = POST_PROCESSING_NOTE


# --- consensus (router <-> node) --------------------------------------------------------------


class CandidatesRequest(_ApiModel):
    """Top-k next tokens of the global model after ``prompt`` + ``token_ids``."""

    prompt: PromptText
    token_ids: TokenIdList = []
    k: int = Field(ge=1, le=MAX_CANDIDATES)


class CandidatesResponse(_ApiModel):
    """Candidate token ids, best first, and the global model version that produced them."""

    candidates: list[int]
    model_version: str


class ConsensusOpenRequest(_ApiModel):
    """Open a consensus session: the node charges its ledger for up to ``max_tokens`` ballots.

    ``prompt`` comes with the request so the node can refuse one it would not vote on before
    anything is charged; ``noise_multiplier`` is σ/√2 of every ballot, at least the node's floor.
    """

    session_id: SessionId
    prompt: PromptText
    noise_multiplier: float = Field(gt=0.0, allow_inf_nan=False)
    max_tokens: int = Field(ge=1, le=MAX_TOKENS_LIMIT, strict=True)


class ConsensusOpenResponse(_ApiModel):
    """``charged`` is False when the session was already open (idempotent re-open).

    ``hospital_id`` names the ledger that was charged (the router counts one ballot per
    hospital); ``epsilon`` is that session's ε at the ledger's δ.
    """

    node_id: str
    hospital_id: str
    charged: bool
    epsilon: float
    remaining_epsilon: float | None


class VoteRequest(_ApiModel):
    """The node's noisy ballot over ``candidates`` for the next token."""

    session_id: SessionId
    prompt: PromptText
    token_ids: TokenIdList = []
    candidates: Annotated[
        list[Annotated[int, Field(ge=0, strict=True)]],
        Field(min_length=1, max_length=MAX_CANDIDATES),
    ]


class VoteResponse(_ApiModel):
    """``ballot[i]`` is the node's vote for ``candidates[i]`` (0 or 1) plus its Gaussian noise."""

    node_id: str
    ballot: list[float]


class DecodeRequest(_ApiModel):
    """Token ids to turn into text with the node's tokenizer."""

    token_ids: TokenIdList = []


class DecodeResponse(_ApiModel):
    """The decoded text and the id that ends generation."""

    text: str
    eos_token_id: int


class AdapterHealth(_ApiModel):
    """The global adapter a node serves and the DP guarantee it was accepted with.

    ``dp_record`` is the summary of its ``dp-record.json`` (run_id, epsilon per hospital,
    max_epsilon, epsilon_confirmed, delta, accountant, unit, neighbouring); ``null`` only when
    the node's ``allow_non_dp_adapters`` let an adapter without a valid record in.
    """

    version: str
    dp_record: dict[str, Any] | None


class NodeLimitsReport(_ApiModel):
    """The node's request limits, so the router refuses what the node would, before charging."""

    max_prompt_chars: int
    max_tokens: int


class NodeConsensusReport(_ApiModel):
    """Consensus as this node offers it (absent when the node has no ledger: disabled)."""

    min_noise_multiplier: float
    client_authenticated: bool


class NodeHealth(_ApiModel):
    """GET /v1/health: what the router needs to route to this node.

    ``adapter`` is null when the node serves the base model; ``adapter_issue`` says why no
    adapter (or not the newest one) is served, e.g. a refused adapter without a DP record.
    """

    status: Literal["ok", "degraded"]
    node_id: str
    hospital_id: str
    model_version: str
    specialisations: list[str]
    in_flight: int
    remaining_epsilon: float | None
    adapter: AdapterHealth | None = None
    adapter_issue: str | None = None
    limits: NodeLimitsReport
    consensus: NodeConsensusReport | None = None
