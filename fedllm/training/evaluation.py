"""Held-out evaluation: mean loss and perplexity, token-weighted or per unit with clipping.

Token-weighted loss is the usual language-modelling figure, but one long record moves it
without bound. A hospital that releases its evaluation under DP instead clips each unit's mean
token loss to ``[0, L]`` and sums over units, so one patient moves the sum by at most L and a
Gaussian of scale σL makes it private. Both forms are a sum and a count, which combine across
hospitals exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedllm.training.loss import per_sequence_loss, token_losses
from fedllm.training.sequences import EncodedSequences


@dataclass(frozen=True)
class EvaluationResult:
    """A summed loss and what it is summed over (tokens, or clipped units), for exact pooling."""

    loss_sum: float
    count: float

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.count if self.count > 0 else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_loss) if self.count > 0 else float("nan")


def combine(results: list[EvaluationResult]) -> EvaluationResult:
    """Pool several hospitals' results as if their held-out sets were one."""
    return EvaluationResult(sum(r.loss_sum for r in results), sum(r.count for r in results))


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


@torch.no_grad()
def evaluate_clipped_units(
    model: nn.Module, data: EncodedSequences, loss_clip: float, batch_size: int = 64
) -> EvaluationResult:
    """Σ over units of min(mean token loss, ``loss_clip``), and the number of units."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = 0.0
    for start in range(0, len(data), batch_size):
        batch = data.select(torch.arange(start, min(start + batch_size, len(data))))
        losses = per_sequence_loss(
            model, batch.input_ids.to(device), batch.attention_mask.to(device)
        )
        loss_sum += float(losses.clamp(min=0.0, max=loss_clip).sum())
    return EvaluationResult(loss_sum, len(data))
