"""Held-out evaluation: token-weighted mean loss and perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedllm.training.loss import token_losses
from fedllm.training.sequences import EncodedSequences


@dataclass(frozen=True)
class EvaluationResult:
    """Summed token loss and token count, so results from hospitals combine exactly."""

    loss_sum: float
    tokens: int

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss) if self.tokens else float("nan")


def combine(results: list[EvaluationResult]) -> EvaluationResult:
    """Pool several hospitals' results as if their held-out sets were one."""
    return EvaluationResult(sum(r.loss_sum for r in results), sum(r.tokens for r in results))


@torch.no_grad()
def evaluate(model: nn.Module, data: EncodedSequences, batch_size: int = 64) -> EvaluationResult:
    """Token-level loss of ``model`` on ``data`` (no gradients, eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data.select(torch.arange(start, min(start + batch_size, len(data))))
        losses, mask = token_losses(
            model, batch.input_ids.to(device), batch.attention_mask.to(device)
        )
        loss_sum += float(losses.sum())
        tokens += int(mask.sum())
    return EvaluationResult(loss_sum, tokens)
