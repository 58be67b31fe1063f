"""Tokenised training sequences as fixed-shape tensors, the form every trainer here consumes.

Padding every sequence to the same length keeps per-example gradient shapes identical across
Poisson-sampled batches of varying size, and the explicit ``position_ids`` stop models with
learned position embeddings from broadcasting one position row across the batch, which would
make their per-sample gradients wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedllm.privacy.randomness import RandomStream


@dataclass(frozen=True)
class EncodedSequences:
    """``input_ids`` and ``attention_mask`` of shape (num_sequences, max_length)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, indices: torch.Tensor) -> EncodedSequences:
        """The sequences at ``indices`` (a possibly empty Poisson sample)."""
        return EncodedSequences(self.input_ids[indices], self.attention_mask[indices])

    def poisson_sample(self, sample_rate: float, stream: RandomStream) -> torch.Tensor:
        """Indices of a Poisson sample: each sequence independently with probability q."""
        return torch.nonzero(stream.poisson_mask(len(self), sample_rate)).squeeze(1)


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> EncodedSequences:
    """Tokenise, append end-of-sequence, truncate and right-pad to ``max_length``."""
    eos = tokenizer.eos_token or ""
    encoded = tokenizer(
        [text + eos for text in texts],
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return EncodedSequences(encoded["input_ids"], encoded["attention_mask"])


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    """One explicit row of positions per sequence (shape of ``input_ids``)."""
    length = input_ids.shape[1]
    return torch.arange(length, device=input_ids.device).expand(input_ids.shape[0], length)
