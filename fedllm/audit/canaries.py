"""Audit canaries: units planted at a hospital whose presence an attacker tries to detect.

Every canary occupies one *slot*, an extra unit of the hospital's dataset, and a fair coin
S_i decides which of two contents the slot holds: the canary (S_i = +1, "included") or its
counterpart (S_i = −1). Changing one coin replaces one unit by another, exactly fedllm's
replace-one neighbouring relation, so the hospital's reported (ε, δ) bounds what any attacker
can learn about each S_i, and the dataset size (public) does not depend on the coins.

* Gradient canaries (white-box, as in Nasr et al. 2023): slot i contributes the per-sample
  gradient ``±C·s_i·e_{j_i}`` (a Dirac direction on its own coordinate j_i of the trainable
  parameters, random sign s_i, norm equal to the clipping norm C) whenever Poisson sampling
  picks it, through the hook of :func:`fedllm.training.local.train_locally`. The server's score
  is the projection of the hospital's released updates on the canary direction, after
  subtracting what the other hospitals' updates predict (:meth:`GradientCanaries.scores`).
* Text canaries (black-box): slot i holds one of two random token sequences behind a fixed
  prefix, a secret-sharer canary (Carlini et al. 2019). The score is how much lower the
  final model's loss is on the planted sequence's candidate than on the other one.

Coins, coordinates, signs and secrets come from OS entropy; none of them touches the DP
noise stream, which stays the hospital's own fresh stream.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedllm.training.loss import per_sequence_loss
from fedllm.training.sequences import EncodedSequences

CANARY_PREFIX = "patient access code:"
SECRET_TOKENS = 8
REFERENCE_SECRETS = 255
# A gradient canary's norm before clipping, in clipping norms. Under DP, Opacus clips it to C
# like any patient's gradient, so the audited mechanism is unchanged; without DP nothing bounds
# a patient's gradient, and a canary as large as an outlier patient's (real per-patient norms
# reach ~5 C on the quick start) shows what an unprotected run exposes.
CANARY_NORM_IN_CLIPPING_NORMS = 20.0
_SCORING_BATCH = 128


def entropy_rng() -> np.random.Generator:
    """A generator seeded with 128 bits of OS entropy (never from the config)."""
    return np.random.default_rng(secrets.randbits(128))


def inclusion_coins(count: int, rng: np.random.Generator) -> np.ndarray:
    """One fair coin per canary slot: True means the canary itself is planted."""
    return rng.random(count) < 0.5


@dataclass
class GradientCanaries:
    """Dirac gradient canaries on distinct coordinates of the flattened trainable parameters."""

    coordinates: np.ndarray
    signs: np.ndarray
    included: np.ndarray
    norm: float
    dimension: int

    @classmethod
    def draw(cls, count: int, dimension: int, norm: float) -> GradientCanaries:
        """``count`` canaries on distinct random coordinates, random signs, fair coins."""
        if count > dimension:
            raise ValueError(
                f"--canaries {count} exceeds the {dimension} trainable parameters a white-box "
                "audit can give each canary its own coordinate in"
            )
        rng = entropy_rng()
        coordinates = rng.choice(dimension, size=count, replace=False)
        signs = rng.choice(np.array([-1.0, 1.0]), size=count)
        return cls(coordinates, signs, inclusion_coins(count, rng), norm, dimension)

    def sampler(self, sample_rate: float):
        """The training hook: each step, every slot joins the batch with probability q."""
        rng = entropy_rng()
        contents = self.signs * np.where(self.included, 1.0, -1.0) * self.norm

        def extra_samples() -> torch.Tensor | None:
            chosen = np.flatnonzero(rng.random(len(self.coordinates)) < sample_rate)
            if len(chosen) == 0:
                return None
            rows = torch.zeros((len(chosen), self.dimension), dtype=torch.float32)
            rows[torch.arange(len(chosen)), torch.from_numpy(self.coordinates[chosen])] = (
                torch.from_numpy(contents[chosen]).float()
            )
            return rows

        return extra_samples

    def scores(
        self,
        released_deltas: list[torch.Tensor],
        references: list[torch.Tensor] | None = None,
    ) -> np.ndarray:
        """Σ over rounds of the standardized step against each canary's gradient.

        A gradient step moves parameters *against* the gradient, so an included canary pushes
        its coordinate by −s_i and an excluded one by +s_i: the round's score is −Δ_j·s_i.
        The rest of Δ_j is the hospital's own drift on that coordinate, the score's noise.
        With ``references`` (the other hospitals' update of the same round, which the server
        also sees) the part of Δ they predict is subtracted first, its coefficient fitted by
        least squares on the canary-free coordinates; each round is then divided by the
        residual's spread on those coordinates so that noisy rounds weigh less. Everything
        used is released or public, so the score is post-processing and the bound stays sound.
        """
        free = np.ones(self.dimension, dtype=bool)
        free[self.coordinates] = False
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
            total -= residual[self.coordinates] * self.signs / (spread if spread > 0.0 else 1.0)
        return total


@dataclass
class TextCanaries:
    """Pairs of secret-sharer sequences; slot i trains on ``pairs[i][0]`` iff included."""

    pairs: EncodedSequences
    references: EncodedSequences
    included: np.ndarray

    @classmethod
    def draw(cls, count: int, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TextCanaries:
        """2·count candidate secrets plus unplanted references, all uniform random tokens."""
        prefix = tokenizer(CANARY_PREFIX)["input_ids"]
        length = len(prefix) + SECRET_TOKENS + 1
        if length > max_length:
            raise ValueError(
                f"model.max_seq_length {max_length} is too short for a {length}-token canary"
            )
        special = set(tokenizer.all_special_ids)
        vocabulary = np.array([i for i in range(len(tokenizer)) if i not in special])
        rng = entropy_rng()

        def sequences(number: int) -> EncodedSequences:
            ids = torch.full((number, max_length), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((number, max_length), dtype=torch.long)
            ids[:, : len(prefix)] = torch.tensor(prefix)
            secret = rng.choice(vocabulary, size=(number, SECRET_TOKENS))
            ids[:, len(prefix) : length - 1] = torch.from_numpy(secret)
            ids[:, length - 1] = tokenizer.eos_token_id
            mask[:, :length] = 1
            return EncodedSequences(ids, mask)

        return cls(sequences(2 * count), sequences(REFERENCE_SECRETS), inclusion_coins(count, rng))

    def planted(self) -> EncodedSequences:
        """The sequence each slot holds: the first of its pair if included, else the second."""
        rows = torch.arange(len(self.included)) * 2 + torch.from_numpy(~self.included).long()
        return self.pairs.select(rows)

    def scores(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Loss gap per slot (second − first), and the exposure of planted and unplanted.

        Exposure (Carlini et al. 2019) is log2 of the candidates' count minus log2 of the
        sequence's rank by loss among the unplanted references and itself: about 1 bit for a
        sequence the model never saw, up to log2(REFERENCE_SECRETS + 1) for a memorised one.
        """
        pair_losses = sequence_losses(model, self.pairs).reshape(-1, 2)
        reference = np.sort(sequence_losses(model, self.references))
        gaps = pair_losses[:, 1] - pair_losses[:, 0]
        planted = np.where(self.included, pair_losses[:, 0], pair_losses[:, 1])
        unplanted = np.where(self.included, pair_losses[:, 1], pair_losses[:, 0])
        return gaps, exposure(planted, reference), exposure(unplanted, reference)


def exposure(losses: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Secret-sharer exposure of each loss against sorted reference losses."""
    ranks = np.searchsorted(reference, losses, side="left") + 1
    return np.log2(len(reference) + 1) - np.log2(ranks)


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
