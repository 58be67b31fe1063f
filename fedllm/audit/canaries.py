"""Audit canaries: units planted at a hospital whose presence an attacker tries to detect.

Every canary occupies one *slot*, an extra unit of the hospital's dataset, and a fair coin
S_i decides which of two contents the slot holds: the canary (S_i = +1, "included") or its
counterpart (S_i = −1). Changing one coin replaces one unit by another, exactly fedllm's
replace-one neighbouring relation, so the hospital's reported (ε, δ) bounds what any attacker
can learn about each S_i, and the dataset size (public) does not depend on the coins.

* Gradient canaries (white-box, as in Nasr et al. 2023): slot i contributes the per-sample
  gradient ``±20·C·s_i·u_i`` (u_i the unit vector spread evenly over its own k coordinates of
  the trainable parameters, disjoint from every other canary's, random sign s_i; DP clips it
  to C) whenever Poisson sampling picks it, through the hook of
  :func:`fedllm.training.local.train_locally`. The server's score
  is the projection of the hospital's released updates on the canary direction, after
  subtracting what the other hospitals' updates predict (:meth:`GradientCanaries.scores`).
* Text canaries (black-box): slot i holds one of two candidate records, each a fixed prefix
  followed by one secret token repeated to fill ``model.max_seq_length`` (a secret-sharer
  canary, Carlini et al. 2019, with the secret's insertion frequency packed into the one
  record a patient may contribute). The score is how much more the final model favours the
  planted candidate's token than the public base model did, after calibrating away the
  fine-tuning's global change of confidence (:func:`calibrated_log_probs`).

Coins, coordinates, signs and secrets come from OS entropy; none of them touches the DP
noise stream, which stays the hospital's own fresh stream.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedllm.training.loss import per_sequence_loss
from fedllm.training.sequences import EncodedSequences, position_ids_for

CANARY_PREFIX = "patient access code:"
REFERENCE_SECRETS = 255
# A gradient canary's norm before clipping, in clipping norms. Under DP, Opacus clips it to C
# like any patient's gradient, so the audited mechanism is unchanged; without DP nothing bounds
# a patient's gradient, and a canary as large as an outlier patient's (real per-patient norms
# reach ~5 C on the quick start) shows what an unprotected run exposes.
CANARY_NORM_IN_CLIPPING_NORMS = 20.0
# At most this many coordinates per gradient canary: each then still gets 20 C / 4 = 5 C, as
# much as an outlier patient's whole gradient, so AdamW's per-coordinate step stays the
# canary's (the quick start, d = 4096 and 3 × 500 canaries, uses k = 2).
MAX_COORDINATES_PER_CANARY = 16
# Canary slots per audited hospital when --canaries is not given. Every slot is a unit, so
# with n patients the sample rate is q = B / (n + m): fewer slots are each drawn more often
# and share the adapter's few weights with fewer planted ones. A gradient canary owns its
# coordinates, but they are few (4096 on the quick start, shared by every audited hospital):
# 500 per hospital leave room for two coordinates each and are drawn ~3.6 times in 60 steps,
# which lifts the no-DP bound above 3 where 1000 (one coordinate, ~2.5 draws) stay at
# 2.0-3.0, for a ceiling of 4.54 instead of 5.19. A text canary competes for the same rank-4
# LoRA with every other planted one: on the quick start without DP, 32 per run reach AUC
# 0.53-0.67 (4 runs pooled) where 1000 stay at chance, and 8 per run (8 runs pooled) reach
# 0.59-0.68, no better. Pool runs (--runs K) rather than planting more in one.
DEFAULT_CANARIES = {"whitebox": 500, "blackbox": 32}
_SCORING_BATCH = 128
# sequences per forward pass of the calibration, whose log-probabilities span the vocabulary
_CALIBRATION_BATCH = 16


def entropy_rng() -> np.random.Generator:
    """A generator seeded with 128 bits of OS entropy (never from the config)."""
    return np.random.default_rng(secrets.randbits(128))


def inclusion_coins(count: int, rng: np.random.Generator) -> np.ndarray:
    """One fair coin per canary slot: True means the canary itself is planted."""
    return rng.random(count) < 0.5


@dataclass
class GradientCanaries:
    """Sparse gradient canaries: slot i owns the coordinates ``coordinates[i]`` (k of them).

    Its gradient is ``±norm·s_i·u_i``, u_i the unit vector spread evenly over its k
    coordinates. Under DP, Opacus clips it to C whatever k is, and the DP noise is independent
    per coordinate, so spreading changes nothing for the mechanism (signal and noise both grow
    by √k along u_i). Without DP, AdamW normalizes every coordinate's step, so each of the k
    coordinates carries a full step of the canary while the drift adds up only as √k: spreading
    is what lets a canary stand out of the real data's drift.
    """

    coordinates: np.ndarray
    signs: np.ndarray
    included: np.ndarray
    norm: float
    dimension: int

    @property
    def per_canary(self) -> int:
        """k, the coordinates each canary spreads over."""
        return int(self.coordinates.shape[1])

    def sampler(self, sample_rate: float):
        """The training hook: each step, every slot joins the batch with probability q."""
        rng = entropy_rng()
        per_coordinate = self.norm / math.sqrt(self.per_canary)
        contents = self.signs * np.where(self.included, 1.0, -1.0) * per_coordinate
        spread = torch.from_numpy(self.coordinates)

        def extra_samples() -> torch.Tensor | None:
            chosen = np.flatnonzero(rng.random(len(self.coordinates)) < sample_rate)
            if len(chosen) == 0:
                return None
            rows = torch.zeros((len(chosen), self.dimension), dtype=torch.float32)
            values = torch.from_numpy(contents[chosen]).float()[:, None]
            rows.scatter_(1, spread[chosen], values.expand(-1, self.per_canary).contiguous())
            return rows

        return extra_samples

    def scores(
        self,
        released_deltas: list[torch.Tensor],
        references: list[torch.Tensor] | None = None,
        free: np.ndarray | None = None,
    ) -> np.ndarray:
        """Σ over rounds and over its coordinates of the standardized step against each canary.

        A gradient step moves parameters *against* the gradient, so an included canary pushes
        its coordinates by −s_i and an excluded one by +s_i: the round's score is −Δ·s_i summed
        over the canary's coordinates. The rest of Δ is the hospital's own drift there, the
        score's noise. With ``references`` (the other hospitals' update of the same round,
        which the server also sees) the part of Δ they predict is subtracted first, its
        coefficient fitted by least squares on the canary-free coordinates (``free``: by
        default those with no canary of this hospital); each round is then divided by the
        residual's spread on those coordinates so that noisy rounds weigh less. Everything
        used is released or public, so the score is post-processing and the bound stays sound.
        """
        if free is None:
            free = np.ones(self.dimension, dtype=bool)
            free[self.coordinates.ravel()] = False
        total = np.zeros(len(self.coordinates))
        for index, delta in enumerate(released_deltas):
            residual = delta.double().numpy()
            if references is not None:
                reference = references[index].double().numpy()
                energy = float(reference[free] @ reference[free])
                if energy > 0.0:
                    fitted = float(residual[free] @ reference[free]) / energy
                    residual = residual - fitted * reference
            spread = float(residual[free].std()) if free.any() else 0.0
            steps = residual[self.coordinates].sum(axis=1)
            total -= steps * self.signs / (spread if spread > 0.0 else 1.0)
        return total


def draw_gradient_canaries(
    counts: list[int], dimension: int, norm: float
) -> list[GradientCanaries]:
    """Canaries for several hospitals at once, on pairwise disjoint coordinates.

    Disjoint across hospitals, so that no hospital's canary moves a coordinate another
    hospital's canary is scored on. Each canary takes k = ⌊¾·d / Σcounts⌋ coordinates (at
    least 1, at most :data:`MAX_COORDINATES_PER_CANARY`), so that, unless the canaries need
    more than ¾ of the d trainable parameters one coordinate each, a quarter stays
    canary-free for the score's fit and spread (:meth:`GradientCanaries.scores`).
    Coordinates, signs and coins come from OS entropy.
    """
    total = sum(counts)
    if total > dimension:
        raise ValueError(
            f"--canaries {max(counts)} per audited hospital needs {total} of the {dimension} "
            "trainable parameters, one coordinate per canary; use at most "
            f"{dimension // len(counts)}"
        )
    per_canary = min(MAX_COORDINATES_PER_CANARY, max(1, (3 * dimension) // (4 * total)))
    rng = entropy_rng()
    order = rng.permutation(dimension)
    drawn, offset = [], 0
    for count in counts:
        taken = order[offset : offset + count * per_canary].reshape(count, per_canary)
        offset += count * per_canary
        signs = rng.choice(np.array([-1.0, 1.0]), size=count)
        drawn.append(GradientCanaries(taken, signs, inclusion_coins(count, rng), norm, dimension))
    return drawn


@dataclass
class TextCanaries:
    """Pairs of repeated-token records; slot i trains on ``pairs[i][0]`` iff included.

    Every candidate's secret is its own token, distinct from every other candidate's and
    reference's, so no other canary (planted or not) trains the token a slot is scored on.
    """

    pairs: EncodedSequences
    references: EncodedSequences
    included: np.ndarray
    prefix_length: int

    @classmethod
    def draw(cls, count: int, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TextCanaries:
        """2·count candidates and up to 255 unplanted references, each its own random token."""
        prefix = tokenizer(CANARY_PREFIX)["input_ids"]
        if len(prefix) + 2 > max_length:
            raise ValueError(
                f"model.max_seq_length {max_length} is too short for a canary: its "
                f"{len(prefix)}-token prefix needs at least 2 more positions"
            )
        special = set(tokenizer.all_special_ids)
        vocabulary = np.array([i for i in range(len(tokenizer)) if i not in special])
        if 2 * count > len(vocabulary):
            raise ValueError(
                f"--canaries {count} needs {2 * count} distinct secret tokens; the tokenizer "
                f"has {len(vocabulary)} (use at most {len(vocabulary) // 2} black-box canaries)"
            )
        rng = entropy_rng()
        tokens = rng.permutation(vocabulary)
        references = min(REFERENCE_SECRETS, len(vocabulary) - 2 * count)

        def records(secrets_: np.ndarray) -> EncodedSequences:
            ids = torch.from_numpy(secrets_).long()[:, None].repeat(1, max_length)
            ids[:, : len(prefix)] = torch.tensor(prefix)
            return EncodedSequences(ids, torch.ones_like(ids))

        return cls(
            records(tokens[: 2 * count]),
            records(tokens[2 * count : 2 * count + references]),
            inclusion_coins(count, rng),
            len(prefix),
        )

    def planted(self) -> EncodedSequences:
        """The record each slot holds: the first of its pair if included, else the second."""
        rows = torch.arange(len(self.included)) * 2 + torch.from_numpy(~self.included).long()
        return self.pairs.select(rows)

    def scores(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Calibrated gap per slot (first − second), and the exposure of planted and unplanted.

        A candidate's evidence is the sum, over its secret positions, of the final model's
        calibrated log-probability of the secret (:func:`calibrated_log_probs`). Exposure
        (Carlini et al. 2019) is log2 of the candidates' count minus log2 of the candidate's
        rank by that evidence among the unplanted references and itself: about 1 bit for a
        record the model never saw, up to log2(references + 1) for a memorised one.
        """
        evidence = self._evidence(model, self.pairs).reshape(-1, 2)
        reference = np.sort(-self._evidence(model, self.references))
        gaps = evidence[:, 0] - evidence[:, 1]
        planted = np.where(self.included, evidence[:, 0], evidence[:, 1])
        unplanted = np.where(self.included, evidence[:, 1], evidence[:, 0])
        return gaps, exposure(-planted, reference), exposure(-unplanted, reference)

    def _evidence(self, model: nn.Module, data: EncodedSequences) -> np.ndarray:
        calibrated = calibrated_log_probs(model, data)
        return calibrated[:, self.prefix_length - 1 :].sum(axis=1)


def exposure(losses: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Secret-sharer exposure of each loss against sorted reference losses."""
    ranks = np.searchsorted(reference, losses, side="left") + 1
    return np.log2(len(reference) + 1) - np.log2(ranks)


@torch.no_grad()
def calibrated_log_probs(model: nn.Module, data: EncodedSequences) -> np.ndarray:
    """Per position, how much more the final model favours the next token than the base did.

    Fine-tuning changes the model's confidence everywhere (on the quick start every random
    token gains ~6 nats at once, planted or not), which drowns a canary's own trace in the
    raw loss. A change of temperature moves every token's log-probability by a line in the
    base model's log-probability at that position, so the line fitted across the whole
    vocabulary (least squares, per position) predicts it; what is left at the actual next
    token is the evidence that this sequence itself was trained on: a reference-model
    calibration (Carlini et al. 2022) with the public base model as the reference, and the
    whole vocabulary of the position as the calibration set. ``model`` is the LoRA model;
    the base model is the same network with its adapter disabled. Each vocabulary entry is
    the loss of a one-token variant of the query, so nothing beyond the final model's losses
    (and the public base model) is used. Shape (sequences, length − 1), 0 where masked.
    """
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(data), _CALIBRATION_BATCH):
        batch = data.select(torch.arange(start, min(start + _CALIBRATION_BATCH, len(data))))
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        final = _next_token_log_probs(model, ids, mask)
        with model.disable_adapter():
            base = _next_token_log_probs(model, ids, mask)
        base_centred = base - base.mean(dim=-1, keepdim=True)
        final_centred = final - final.mean(dim=-1, keepdim=True)
        slope = (base_centred * final_centred).sum(dim=-1, keepdim=True) / (
            base_centred.square().sum(dim=-1, keepdim=True).clamp(min=1e-12)
        )
        residual = final_centred - slope * base_centred
        targets = ids[:, 1:, None]
        rows.append(residual.gather(-1, targets)[..., 0] * mask[:, 1:])
    return torch.cat(rows).cpu().numpy() if rows else np.zeros((0, data.input_ids.shape[1] - 1))


def _next_token_log_probs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(input_ids),
    ).logits
    return torch.log_softmax(logits[:, :-1].double(), dim=-1)


@torch.no_grad()
def sequence_losses(model: nn.Module, data: EncodedSequences) -> np.ndarray:
    """Mean token loss of every sequence under ``model`` (the attacker's black-box query)."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for start in range(0, len(data), _SCORING_BATCH):
        batch = data.select(torch.arange(start, min(start + _SCORING_BATCH, len(data))))
        losses.append(
            per_sequence_loss(model, batch.input_ids.to(device), batch.attention_mask.to(device))
        )
    return torch.cat(losses).double().cpu().numpy() if losses else np.zeros(0)
