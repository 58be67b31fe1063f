"""Load a base causal LM and its tokenizer, and wrap it with a LoRA adapter.

``model.name`` is ``tiny`` (the embedded default), a local directory, or a Hugging Face id.
Hub access follows the usual ``HF_HUB_OFFLINE`` switch; a model that is not available locally
in offline mode is a clear ``ModelLoadError``, not a stack of connection retries.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from fedllm.config.schema import ModelConfig
from fedllm.models.tiny import ensure_tiny_model

TINY_MODEL_NAME = "tiny"


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says which and why."""


def resolve_model_path(config: ModelConfig, seed: int = 0) -> str:
    """The directory or hub id to load: the cached tiny model is built on first use."""
    if config.name == TINY_MODEL_NAME:
        return str(ensure_tiny_model(config.tiny, seed))
    return config.name


def load_tokenizer(config: ModelConfig, seed: int = 0) -> Tokenizer:
    """The model's tokenizer, with a pad token (causal LMs often ship without one)."""
    source = resolve_model_path(config, seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load tokenizer for model '{config.name}': {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(config: ModelConfig, device: torch.device, seed: int = 0) -> PreTrainedModel:
    """The frozen base model, already on ``device``."""
    source = resolve_model_path(config, seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model '{config.name}': {error}") from None
    if Path(source).is_dir() or config.name == TINY_MODEL_NAME:
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


def load_lora_model(config: ModelConfig, device: torch.device, seed: int = 0) -> PeftModel:
    """Base model on ``device`` plus a LoRA adapter initialised from ``seed``."""
    base = load_base_model(config, device, seed)
    torch.manual_seed(seed)
    return with_lora(base, config)
