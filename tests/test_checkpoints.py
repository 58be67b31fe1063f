"""Adapter checkpoints at rest: plaintext without a key ring, AES-GCM with one, tamper-evident.

Key rings are handed in, as the ServerApp hands in the one it read from its environment.
"""

from __future__ import annotations

import io

import pytest
import torch
from federation_helpers import TINY_TEST_MODEL, randomised_lora_model
from peft import PeftModel, get_peft_model_state_dict

from fedllm.config.schema import ModelConfig
from fedllm.models.adapters import adapter_state, load_adapter_state
from fedllm.models.checkpoints import (
    adapter_directory_writer,
    load_round_checkpoint,
    read_artifact,
    save_adapter_directory,
)
from fedllm.models.loading import load_base_model, load_lora_model
from fedllm.security.encryption import EncryptionError, IntegrityError, KeyRing, write_encrypted
from fedllm.serving.node.generation import AdapterLoadError, read_adapter

MODEL = ModelConfig.model_validate({**TINY_TEST_MODEL, "lora": {"r": 2, "alpha": 4.0}})
ROUND_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def lora_model():
    return randomised_lora_model(MODEL, seed=1)


@pytest.fixture(scope="module")
def writer_model():
    """The model the ServerApp's round-checkpoint writer overwrites (one of its own)."""
    return load_lora_model(MODEL, torch.device("cpu"), seed=0)


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing.generate()


def _state(seed: int) -> dict[str, torch.Tensor]:
    """A global adapter as the strategy holds it: random, distinct from a fresh adapter."""
    return adapter_state(randomised_lora_model(MODEL, seed=seed))


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name].cpu(), right[name].cpu()), name


def test_round_checkpoint_is_a_peft_directory_without_a_key_ring(tmp_path, writer_model):
    writer = adapter_directory_writer(writer_model, keyring=None)
    state = _state(seed=2)
    directory = tmp_path / "checkpoints" / "round-0001"
    writer(state, directory)
    assert sorted(p.name for p in directory.iterdir()) == ROUND_FILES
    assert sorted(p.name for p in directory.parent.iterdir()) == ["round-0001"]  # no staging
    # what resume reads back is bit-identical to what the strategy handed over, and so is the
    # global adapter it restarts from (as run_federation loads it into a fresh model)
    _assert_same(load_round_checkpoint(directory, keyring=None), state)
    resumed = load_lora_model(MODEL, torch.device("cpu"), seed=5)
    load_adapter_state(resumed, load_round_checkpoint(directory, keyring=None))
    _assert_same(adapter_state(resumed), state)
    # and it is an ordinary peft adapter
    loaded = PeftModel.from_pretrained(load_base_model(MODEL, torch.device("cpu")), directory)
    _assert_same(adapter_state(loaded), state)


def test_round_checkpoint_is_encrypted_and_tampering_is_detected(tmp_path, writer_model, keyring):
    writer = adapter_directory_writer(writer_model, keyring=keyring)
    state = _state(seed=3)
    first = tmp_path / "checkpoints" / "round-0001"
    writer(state, first)
    assert sorted(p.name for p in first.iterdir()) == ROUND_FILES
    weights = first / "adapter_model.safetensors"
    assert b"lora_A" not in weights.read_bytes()
    assert b"peft_type" not in (first / "adapter_config.json").read_bytes()
    _assert_same(load_round_checkpoint(first, keyring=keyring), state)

    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        load_round_checkpoint(first, keyring=keyring)

    # Planting a plaintext adapter where ciphertext is expected is refused too.
    plain = tmp_path / "plain"
    adapter_directory_writer(writer_model, keyring=None)(state, plain)
    weights.write_bytes((plain / "adapter_model.safetensors").read_bytes())
    with pytest.raises(IntegrityError, match="plaintext"):
        load_round_checkpoint(first, keyring=keyring)

    second = tmp_path / "checkpoints" / "round-0002"
    writer(state, second)
    with pytest.raises(EncryptionError, match="encrypted"):
        load_round_checkpoint(second, keyring=None)


def test_round_checkpoints_of_older_runs_are_still_read(tmp_path, keyring):
    """Runs from before round checkpoints were peft directories recorded round-NNNN.pt."""
    state = _state(seed=4)
    encrypted = tmp_path / "round-0001.pt"
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as those runs wrote it: torch.save, then encrypted
    write_encrypted(encrypted, buffer.getvalue(), keyring)
    _assert_same(load_round_checkpoint(encrypted, keyring=keyring), state)

    plain = tmp_path / "round-0002.pt"
    torch.save(state, plain)
    _assert_same(load_round_checkpoint(plain, keyring=None), state)

    with pytest.raises(FileNotFoundError, match="no round checkpoint"):
        load_round_checkpoint(tmp_path / "round-0003", keyring=keyring)


def test_adapter_directory_is_served_encrypted_and_refused_when_tampered(
    tmp_path, lora_model, keyring
):
    directory = tmp_path / "checkpoint"
    save_adapter_directory(lora_model, directory, keyring=keyring)
    assert not (tmp_path / "checkpoint.staging").exists()
    weights = directory / "adapter_model.safetensors"
    assert b"lora_A" not in weights.read_bytes()
    assert b"peft_type" not in (directory / "adapter_config.json").read_bytes()

    loaded = read_adapter(directory, keyring=keyring)
    _assert_same(loaded.state, get_peft_model_state_dict(lora_model))
    with pytest.raises(AdapterLoadError, match="encrypted"):
        read_adapter(directory, keyring=None)

    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(AdapterLoadError, match="unreadable adapter"):
        read_adapter(directory, keyring=keyring)


def test_adapter_directory_without_key_ring_is_plain_peft(tmp_path, lora_model):
    directory = tmp_path / "checkpoint"
    save_adapter_directory(lora_model, directory, keyring=None)
    assert b"peft_type" in read_artifact(directory / "adapter_config.json", keyring=None)
    _assert_same(read_adapter(directory, keyring=None).state, get_peft_model_state_dict(lora_model))
