"""The loss statistic behind Oort-style statistical utility, computed at the hospital.

Oort rates a client by |B|·sqrt(mean over B of loss²): hospitals whose data the current
model still fits badly have more to teach it. Each loss is clipped to ``loss_clip`` so that
one record moves the sum of squares by at most ``loss_clip²``, which is the sensitivity the
Gaussian release in :mod:`fedllm.privacy.releases` is calibrated to.
"""

from __future__ import annotations

import torch
from torch import nn

from fedllm.privacy.randomness import RandomStream
from fedllm.training.loss import per_sequence_loss
from fedllm.training.sequences import EncodedSequences


@torch.no_grad()
def clipped_square_loss_sum(
    model: nn.Module,
    data: EncodedSequences,
    sample_rate: float,
    loss_clip: float,
    stream: RandomStream,
) -> float:
    """Σ min(loss, clip)² over a fresh Poisson sample of the hospital's sequences."""
    chosen = data.poisson_sample(sample_rate, stream)
    if len(chosen) == 0:
        return 0.0
    batch = data.select(chosen)
    device = next(model.parameters()).device
    model.eval()
    losses = per_sequence_loss(model, batch.input_ids.to(device), batch.attention_mask.to(device))
    return float((losses.clamp(max=loss_clip) ** 2).sum())
