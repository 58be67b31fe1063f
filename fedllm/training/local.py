"""Local training at a hospital: Poisson-sampled DP-SGD through Opacus, or the same loop without DP.

Every step samples each of the hospital's sequences independently with probability
``q = expected_batch_size / n`` (Poisson sampling, the assumption of the accountant), computes
per-sequence losses, and, with DP, lets Opacus clip each sequence's gradient to
``max_grad_norm`` and add Gaussian noise of standard deviation ``σ·max_grad_norm`` before
dividing by the *expected* batch size. An empty sample still takes a noisy step: skipping it
would reveal that nobody was sampled. The non-private path runs the identical loop without
clipping or noise, so that the DP overhead benchmark compares like with like.

Sampling and noise both come from one :class:`~fedllm.privacy.randomness.RandomStream`: under
DP a fresh OS-seeded one (never a config seed, which would let the server regenerate and
subtract the noise); Opacus' own noise draw is replaced by :class:`StreamNoiseDPOptimizer` so
that the same stream, and the ``secure`` source when configured, feeds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from fedllm.privacy.events import sample_rate_for
from fedllm.privacy.randomness import RandomStream
from fedllm.training.loss import per_sequence_loss
from fedllm.training.sequences import EncodedSequences


@dataclass(frozen=True)
class DpSgdSettings:
    """The two knobs of DP-SGD: noise multiplier σ and per-example clipping norm C."""

    noise_multiplier: float
    max_grad_norm: float


ExtraSamples = Callable[[], torch.Tensor | None]
"""Audit hook (``fedllm.audit``): per-sample gradients, shape (k, d) over the trainable
parameters flattened in order, that join a step's batch *before* clipping and noise, or None.
Never set in training; it lets a privacy audit plant gradient canaries exactly where a real
patient's gradient enters DP-SGD."""


@dataclass(frozen=True)
class LocalTrainingResult:
    """What one round of local training did; the privacy fields feed the hospital's ledger."""

    steps: int
    sample_rate: float
    noise_multiplier: float | None
    mean_loss: float
    seconds: float


class StreamNoiseDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with its Gaussian noise drawn from a :class:`RandomStream`.

    Opacus draws from a ``torch.Generator`` (the global one unless given), which cannot be the
    OS CSPRNG; overriding the one method that draws keeps clipping, accumulation and scaling
    exactly Opacus' own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, stream: RandomStream, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.stream = stream

    def add_noise(self) -> None:
        """Add N(0, (σC)²) to every clipped gradient sum (as Opacus does, from our stream)."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.stream.normal(
                p.summed_grad.shape, std, device=p.summed_grad.device, dtype=p.summed_grad.dtype
            )
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def make_optimizer(
    parameters: list[nn.Parameter], name: str, learning_rate: float
) -> torch.optim.Optimizer:
    """The configured optimiser over the trainable parameters."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate)
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)


def train_locally(
    model: nn.Module,
    data: EncodedSequences,
    *,
    steps: int,
    expected_batch_size: int,
    learning_rate: float,
    optimizer_name: str = "adamw",
    dp: DpSgdSettings | None = None,
    stream: RandomStream,
    extra_samples: ExtraSamples | None = None,
) -> LocalTrainingResult:
    """Run ``steps`` Poisson-sampled steps on the model's trainable parameters.

    ``stream`` draws the Poisson samples and, with ``dp``, the noise; under DP it must be a
    fresh OS-seeded stream (:func:`~fedllm.privacy.randomness.fresh_stream`).
    ``extra_samples`` is the privacy audit's hook (:data:`ExtraSamples`); None in training.
    """
    if len(data) == 0:
        raise ValueError("a hospital with no training sequences cannot train")
    started = time.perf_counter()
    sample_rate = sample_rate_for(expected_batch_size, len(data))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, optimizer_name, learning_rate)
    device = parameters[0].device
    trained: nn.Module = model
    if dp is not None:
        trained = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = StreamNoiseDPOptimizer(
            optimizer,
            stream=stream,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(sample_rate * len(data))),
            loss_reduction="mean",
        )
    model.train()
    loss_sum, seen = 0.0, 0
    try:
        for _ in range(steps):
            chosen = data.poisson_sample(sample_rate, stream)
            optimizer.zero_grad(set_to_none=True)
            extra = extra_samples() if extra_samples is not None else None
            if len(chosen) == 0:
                if dp is not None:
                    _mark_empty_batch(parameters)
                    _add_samples(parameters, extra, dp=True, batch_size=0)
                    optimizer.step()
                continue
            batch = data.select(chosen)
            losses = per_sequence_loss(
                trained, batch.input_ids.to(device), batch.attention_mask.to(device)
            )
            losses.mean().backward()
            _add_samples(parameters, extra, dp=dp is not None, batch_size=len(chosen))
            optimizer.step()
            loss_sum += float(losses.detach().sum())
            seen += len(chosen)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if isinstance(trained, GradSampleModule):
            trained._close()
        model.eval()
    return LocalTrainingResult(
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=dp.noise_multiplier if dp else None,
        mean_loss=loss_sum / seen if seen else float("nan"),
        seconds=time.perf_counter() - started,
    )


def _mark_empty_batch(parameters: list[nn.Parameter]) -> None:
    """Give Opacus zero per-sample gradients so the step adds pure noise, as DP requires."""
    for parameter in parameters:
        parameter.grad_sample = torch.zeros(
            (0, *parameter.shape), device=parameter.device, dtype=parameter.dtype
        )


def _add_samples(
    parameters: list[nn.Parameter], extra: torch.Tensor | None, *, dp: bool, batch_size: int
) -> None:
    """Join audit gradients to the step's batch: as per-sample rows under DP (Opacus then
    clips and noises them like any patient's), else into the batch-mean gradient."""
    if extra is None or len(extra) == 0:
        return
    offset = 0
    for parameter in parameters:
        rows = extra[:, offset : offset + parameter.numel()].to(parameter.device, parameter.dtype)
        rows = rows.reshape(len(extra), *parameter.shape)
        offset += parameter.numel()
        if dp:
            parameter.grad_sample = torch.cat((parameter.grad_sample, rows))
        else:
            grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            parameter.grad = (grad * batch_size + rows.sum(dim=0)) / (batch_size + len(extra))
