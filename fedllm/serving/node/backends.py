"""What a node server needs from a model, and a constant-time stand-in for tests and benchmarks.

The HTTP layer talks to a `GenerationBackend`, never to torch, so the router can be tested and
its overhead measured against nodes whose "model" costs nothing (`ConstantBackend`), while real
nodes run `fedllm.serving.node.generation.ModelBackend`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]

CONSTANT_REPLY = "This is a constant reply from a fedllm test node."
CONSTANT_EOS_TOKEN_ID = 9999


@dataclass(frozen=True)
class Generation:
    """One generated completion and its token accounting (OpenAI ``usage`` needs both counts)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@runtime_checkable
class GenerationBackend(Protocol):
    """A model as the node server uses it. Implementations must be thread-safe.

    ``candidates`` come from the DP-trained global model (public: post-processing); ``vote`` may
    use the hospital's private local model, which is why votes are only answered inside a
    consensus session the hospital's ledger has been charged for.
    """

    model_version: str
    eos_token_id: int

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> Generation:
        """Continue ``prompt`` by at most ``max_tokens`` tokens (greedy at temperature 0)."""
        ...

    def candidates(self, prompt: str, token_ids: Sequence[int], k: int) -> list[int]:
        """The global model's ``k`` most likely next token ids after prompt + token_ids."""
        ...

    def vote(self, prompt: str, token_ids: Sequence[int], candidates: Sequence[int]) -> int:
        """Index into ``candidates`` of the local model's preferred next token."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``."""
        ...


class ConstantBackend:
    """A trivial, deterministic model whose answers cost (almost) no time.

    Replies are the first ``max_tokens`` words of ``text``; candidates are ``[0, ..., k-1]``;
    the vote is always ``vote_index`` (clamped to the candidates offered); ``latency_s`` adds a
    fixed delay to ``generate`` so routing policies can be tested against slow nodes. Token ids
    decode to ``"t<id>"`` words. The EOS id lies outside the candidates so a consensus answer
    runs to ``max_tokens`` unless a test sets ``eos_token_id`` to a candidate.
    """

    def __init__(
        self,
        text: str = CONSTANT_REPLY,
        *,
        vote_index: int = 0,
        latency_s: float = 0.0,
        model_version: str = "constant",
        eos_token_id: int = CONSTANT_EOS_TOKEN_ID,
    ) -> None:
        if vote_index < 0:
            raise ValueError(f"vote_index must be >= 0, got {vote_index}")
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self.text = text
        self.vote_index = vote_index
        self.latency_s = latency_s
        self.model_version = model_version
        self.eos_token_id = eos_token_id

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        top_p: float = 1.0,
    ) -> Generation:
        """The first ``max_tokens`` words of the fixed reply (word = token)."""
        if self.latency_s:
            time.sleep(self.latency_s)
        words = self.text.split()
        kept = words[:max_tokens]
        return Generation(
            text=" ".join(kept),
            prompt_tokens=len(prompt.split()),
            completion_tokens=len(kept),
            finish_reason="length" if len(words) > max_tokens else "stop",
        )

    def candidates(self, prompt: str, token_ids: Sequence[int], k: int) -> list[int]:
        """``[0, ..., k-1]``, whatever the context."""
        return list(range(k))

    def vote(self, prompt: str, token_ids: Sequence[int], candidates: Sequence[int]) -> int:
        """Always ``vote_index`` (or the last candidate if fewer were offered)."""
        if not candidates:
            raise ValueError("candidates must not be empty")
        return min(self.vote_index, len(candidates) - 1)

    def decode(self, token_ids: Sequence[int]) -> str:
        """``"t<id>"`` per token, space-separated; the EOS id is dropped."""
        return " ".join(f"t{i}" for i in token_ids if i != self.eos_token_id)
