"""DP-SGD at the hospital: Opacus' per-example clipping, LoRA under DP, the per-sequence loss."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedllm.config.schema import ModelConfig
from fedllm.models.loading import with_lora
from fedllm.privacy.randomness import SeededStream
from fedllm.training.local import DpSgdSettings, train_locally
from fedllm.training.loss import per_sequence_loss
from fedllm.training.sequences import encode_texts, position_ids_for

CLIP = 0.05


def _microbatch_clipped_sum(model, batch, parameters):
    """Σ_i clip(∇ loss_i) computed one sequence at a time: the definition Opacus must match."""
    total = [torch.zeros_like(p) for p in parameters]
    for i in range(len(batch)):
        model.zero_grad(set_to_none=True)
        one = batch.select(torch.tensor([i]))
        per_sequence_loss(model, one.input_ids, one.attention_mask).sum().backward()
        grads = [p.grad.detach().clone() for p in parameters]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, CLIP / (float(norm) + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads, strict=True)]
    return total


@pytest.mark.parametrize("trainable", ["lora", "lora+position-embeddings"])
def test_opacus_clipping_matches_microbatch_gradients(
    tokenizer, clinical_texts, tiny_gpt2, trainable
):
    model = with_lora(tiny_gpt2, ModelConfig())
    if trainable == "lora+position-embeddings":
        model.base_model.model.transformer.wpe.weight.requires_grad_(True)
    batch = encode_texts(tokenizer, clinical_texts[:6], 32)
    parameters = [p for p in model.parameters() if p.requires_grad]
    expected = _microbatch_clipped_sum(model, batch, parameters)
    # every sequence's gradient must actually be clipped, or the check is vacuous
    before = [p.detach().clone() for p in parameters]

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.SGD(parameters, lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=CLIP,
        expected_batch_size=len(batch),
        loss_reduction="mean",
    )
    optimizer.zero_grad(set_to_none=True)
    per_sequence_loss(wrapped, batch.input_ids, batch.attention_mask).mean().backward()
    per_sample_norms = torch.stack(
        [g.reshape(len(batch), -1).norm(dim=1) for g in optimizer.grad_samples]
    ).norm(dim=0)
    assert (per_sample_norms > CLIP).all()
    optimizer.step()
    wrapped._close()
    for p, b, e in zip(parameters, before, expected, strict=True):
        torch.testing.assert_close(b - p.detach(), e / len(batch), rtol=1e-4, atol=1e-7)


def test_position_ids_are_explicit_per_sequence():
    ids = torch.zeros((3, 5), dtype=torch.long)
    positions = position_ids_for(ids)
    assert positions.shape == (3, 5)
    assert positions[2].tolist() == [0, 1, 2, 3, 4]


def test_lora_weights_change_under_dp(tokenizer, clinical_texts, tiny_gpt2):
    model = with_lora(tiny_gpt2, ModelConfig())
    data = encode_texts(tokenizer, clinical_texts, 32)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train_locally(
        model,
        data,
        steps=3,
        expected_batch_size=8,
        learning_rate=1e-2,
        dp=DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        stream=SeededStream(0),
    )
    after = dict(model.named_parameters())
    assert before
    assert all("lora_" in name for name in before)
    assert all(not torch.equal(after[n], before[n]) for n in before)
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)
    assert result.noise_multiplier == 1.0
    assert result.sample_rate == pytest.approx(8 / len(data))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_empty_poisson_sample_still_takes_a_noisy_step(tokenizer, clinical_texts, tiny_gpt2):
    model = with_lora(tiny_gpt2, ModelConfig())
    data = encode_texts(tokenizer, clinical_texts[:4], 32)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # q = 1/4; pick a seed whose first Poisson draw samples nobody
    seed = next(s for s in range(1000) if (SeededStream(s).uniform(4) >= 0.25).all())
    result = train_locally(
        model,
        data,
        steps=1,
        expected_batch_size=1,
        learning_rate=1e-2,
        optimizer_name="sgd",
        dp=DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        stream=SeededStream(seed),
    )
    assert math.isnan(result.mean_loss)  # no sequence was sampled
    changed = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert changed, "an empty sample must still release a noisy update"


def test_per_sequence_loss_is_not_batch_token_average(tokenizer, tiny_gpt2):
    short, long = "fever.", "chest pain radiating to the left arm with sweating and nausea today."
    batch = encode_texts(tokenizer, [short, long], 32)
    losses = per_sequence_loss(tiny_gpt2, batch.input_ids, batch.attention_mask)
    assert losses.shape == (2,)
    for i in range(2):
        one = batch.select(torch.tensor([i]))
        alone = per_sequence_loss(tiny_gpt2, one.input_ids, one.attention_mask)
        torch.testing.assert_close(losses[i], alone[0], rtol=1e-5, atol=1e-6)
    hf_loss = tiny_gpt2(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100),
    ).loss
    assert not torch.isclose(losses.mean(), hf_loss, rtol=1e-3)
