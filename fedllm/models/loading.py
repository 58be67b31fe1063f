"""Load a base causal LM and its tokenizer, and wrap it with a LoRA adapter.

``model.name`` is ``tiny`` (the embedded default), a local directory, or a Hugging Face id
already in the local Hugging Face cache (nothing is downloaded). Every load goes through
:func:`fedllm.models.identity.resolve_base_model`, so what is loaded is the model whose content
hash was recorded, and a changed or missing file is a clear ``ModelLoadError`` naming it.
``run.seed`` plays no part in the base model: only the LoRA initialisation takes a seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from fedllm.config.schema import ModelConfig
from fedllm.models.identity import TINY_MODEL_NAME as TINY_MODEL_NAME  # re-exported
from fedllm.models.identity import (
    BaseModelIdentity,
    BaseModelIdentityError,
    resolve_base_model,
)


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says which and why."""


def base_model(config: ModelConfig) -> BaseModelIdentity:
    """The verified identity of ``config``'s base model (the tiny model is built on first use)."""
    try:
        return resolve_base_model(config)
    except BaseModelIdentityError as error:
        raise ModelLoadError(str(error)) from None


def resolve_model_path(config: ModelConfig) -> str:
    """The verified directory to load the base model from."""
    return base_model(config).path


def load_tokenizer(config: ModelConfig) -> Tokenizer:
    """The model's tokenizer, with a pad token (causal LMs often ship without one)."""
    source = resolve_model_path(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load tokenizer for model '{config.name}': {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(config: ModelConfig, device: torch.device) -> PreTrainedModel:
    """The frozen base model, already on ``device``."""
    source = resolve_model_path(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model '{config.name}': {error}") from None
    model.config.name_or_path = config.name
    return model.to(device)


def with_lora(model: PreTrainedModel, config: ModelConfig) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; only the adapter's weights are trainable.

    The model must already be on its final device: peft builds the adapter's weights on the
    base layers' device, and moving the wrapped model afterwards leaves an optimizer (and
    Opacus' per-sample hooks) pointing at stale copies, so DP steps silently stop updating it.
    """
    lora = PeftLoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        fan_in_fan_out=model.config.model_type == "gpt2",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


@contextlib.contextmanager
def public_seed(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for a public initialisation (a LoRA adapter) only, then restore its generators.

    A process that builds a model keeps running (a hospital's warm worker trains for many
    rounds): without the restore, every later draw from torch's global generators (dropout)
    would follow the config's seed. DP noise and sampling never use them (they draw from
    :mod:`fedllm.privacy.randomness`), and this keeps it so for everything else too.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def load_lora_model(config: ModelConfig, device: torch.device, seed: int = 0) -> PeftModel:
    """Base model on ``device`` plus a LoRA adapter initialised from ``seed`` (``run.seed``)."""
    base = load_base_model(config, device)
    with public_seed(seed, device):
        return with_lora(base, config)
