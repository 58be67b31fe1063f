"""Per-sequence language-modelling loss.

DP-SGD clips each example's gradient, so the loss must be a sum of per-example terms: token
losses are averaged *within* each sequence, giving one loss per sequence. Hugging Face's
``outputs.loss`` averages tokens across the whole batch instead, which couples examples and
breaks the per-example sensitivity argument, so it is never used for training here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from fedllm.training.sequences import position_ids_for


def token_losses(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position and the mask of positions that count."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(input_ids),
    ).logits
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].to(logits.dtype)
    losses = functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        reduction="none",
    ).view_as(mask)
    return losses * mask, mask


def per_sequence_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean token loss of each sequence, shape (batch,)."""
    losses, mask = token_losses(model, input_ids, attention_mask)
    return losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
