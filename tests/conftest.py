"""Shared fixtures: a small tokenizer and GPT-2 model built in-process (no download, no cache)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fedllm.data import generate_clinical_records, vocabulary_corpus
from fedllm.models.tokenizer import train_tokenizer


@pytest.fixture(scope="session", autouse=True)
def _private_ledger_root(tmp_path_factory):
    """File-backed simulated hospitals keep ledgers per dataset for its lifetime: tests keep
    theirs in a temporary root (inherited by the processes they start), never the user's."""
    previous = os.environ.get("FEDLLM_LEDGER_DIR")
    os.environ["FEDLLM_LEDGER_DIR"] = str(tmp_path_factory.mktemp("ledgers"))
    yield
    if previous is None:
        os.environ.pop("FEDLLM_LEDGER_DIR", None)
    else:
        os.environ["FEDLLM_LEDGER_DIR"] = previous


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(vocabulary_corpus(0), vocab_size=400)


@pytest.fixture(scope="session")
def clinical_texts() -> list[str]:
    return [r.text for r in generate_clinical_records(96, None, seed=3)]


@pytest.fixture
def tiny_gpt2(tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="session")
def local_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny GPT-2 saved like any Hugging Face model directory, loaded by path (no hub)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=64,
            n_embd=32,
            n_layer=1,
            n_head=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    path = tmp_path_factory.mktemp("local-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
