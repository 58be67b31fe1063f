"""The embedded default base model: a small GPT-2 built from a config, pretrained on public text.

A LoRA adapter on a randomly initialised model teaches nothing worth measuring, so the default
base model is first pretrained without DP on public text: generic medical prose plus a public
library of question/answer vignettes (as a real base model has read textbooks and published
case discussions). The vignettes come from a seed space no hospital draws from and have a
uniform specialty mix; clinical *notes* never appear in the public corpus, so what DP
fine-tuning must learn is the hospitals' note formats and their own mix of specialties.
Building takes about half a minute on a laptop CPU and is cached under a key derived from
its own config only (including ``build_seed``; never ``run.seed``), so a seed sweep trains on
one base model. Weights built on different hardware or thread counts need not be identical,
so the build also records the model's content hash (``base-model.json``, see
fedllm.models.identity): a federation compares it, and an operator can build once with
``fedllm model build`` and ship the directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import structlog
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from fedllm.config.schema import TinyModelConfig
from fedllm.data import generate_clinical_records, generate_public_medical_text, vocabulary_corpus
from fedllm.models.identity import BASE_MODEL_FILE, TINY_MODEL_NAME, cache_root, write_identity
from fedllm.models.tokenizer import train_tokenizer
from fedllm.training.loss import per_sequence_loss
from fedllm.training.sequences import encode_texts

log = structlog.get_logger(__name__)

TINY_VOCAB_SIZE = 1024
TINY_MAX_POSITIONS = 512
PRETRAIN_SEQ_LENGTH = 64
PRETRAIN_BATCH_SIZE = 32
PRETRAIN_LEARNING_RATE = 3e-3
BUILD_VERSION = 4
PUBLIC_CASE_LIBRARY_SEED = 2**20


def tiny_model_dir(config: TinyModelConfig) -> Path:
    """Where the model for ``config`` is (or will be) cached: a key of that config alone."""
    key = json.dumps({"config": config.model_dump(), "v": BUILD_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / f"tiny-gpt2-{digest}"


def ensure_tiny_model(config: TinyModelConfig) -> Path:
    """Return the cached model directory, building and pretraining it first if absent.

    The build, with its ``base-model.json``, happens in a temporary directory renamed into
    place, so concurrent builders (several simulated hospitals starting at once) never see a
    half-written model, and a model in the cache always has its recorded hash.
    """
    target = tiny_model_dir(config)
    if (target / BASE_MODEL_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        model, tokenizer = build_pretrained_tiny_model(config)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_identity(staging, TINY_MODEL_NAME, None)
        try:
            staging.rename(target)
        except OSError:
            if not (target / BASE_MODEL_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("tiny_model.built", path=str(target))
    return target


def build_pretrained_tiny_model(
    config: TinyModelConfig,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Build the tokenizer and model, then pretrain the model on public synthetic text.

    Every random choice comes from ``config.build_seed``: the same config builds the same
    model on the same hardware, whatever experiment asks for it.
    """
    seed = config.build_seed
    # the build's own generator state; restored after, so the builder's later draws are its own
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        public_texts = public_corpus(config.pretrain_texts, seed)
        tokenizer = train_tokenizer([*vocabulary_corpus(seed), *public_texts], TINY_VOCAB_SIZE)
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tokenizer),
                n_positions=TINY_MAX_POSITIONS,
                n_embd=config.hidden_size,
                n_layer=config.layers,
                n_head=config.heads,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        pretrain(model, tokenizer, public_texts, config.pretrain_steps, seed)
        return model, tokenizer


def public_corpus(num_texts: int, seed: int) -> list[str]:
    """Half textbook prose, half public Q&A vignettes (disjoint from every hospital's seeds)."""
    prose = generate_public_medical_text(num_texts - num_texts // 2, seed=seed)
    library = generate_clinical_records(
        2 * num_texts, None, seed=PUBLIC_CASE_LIBRARY_SEED + seed, hospital_tag="public"
    )
    vignettes = [r.text for r in library if r.text.startswith("Question:")][: num_texts // 2]
    return [*prose, *vignettes]


def pretrain(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    steps: int,
    seed: int,
) -> float:
    """Plain full-parameter training on public text; returns the final batch loss."""
    data = encode_texts(tokenizer, texts, PRETRAIN_SEQ_LENGTH)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = data.select(torch.randint(len(data), (PRETRAIN_BATCH_SIZE,), generator=generator))
        loss = per_sequence_loss(model, batch.input_ids, batch.attention_mask).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log.info("tiny_model.pretrain", step=step + 1, of=steps, loss=round(loss.item(), 4))
    model.eval()
    return float(loss.item())
