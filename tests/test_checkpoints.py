"""Adapter checkpoints at rest: plaintext without a key ring, AES-GCM with one, tamper-evident."""

from __future__ import annotations

import pickle

import pytest
import torch
from federation_helpers import TINY_TEST_MODEL, randomised_lora_model
from peft import get_peft_model_state_dict

from fedllm.config.schema import ModelConfig
from fedllm.models.checkpoints import (
    load_adapter_state_file,
    read_artifact,
    save_adapter_directory,
    save_adapter_state,
)
from fedllm.security.encryption import ENV_VAR, EncryptionError, IntegrityError, KeyRing
from fedllm.serving.generation import AdapterLoadError, read_adapter

MODEL = ModelConfig.model_validate({**TINY_TEST_MODEL, "lora": {"r": 2, "alpha": 4.0}})


@pytest.fixture(scope="module")
def lora_model():
    return randomised_lora_model(MODEL, seed=1)


@pytest.fixture
def keyring(monkeypatch) -> KeyRing:
    ring = KeyRing.generate()
    monkeypatch.setenv(ENV_VAR, ring.to_json())
    return ring


def _state() -> dict[str, torch.Tensor]:
    return {"a.lora_A": torch.arange(6.0).reshape(2, 3), "a.lora_B": torch.ones(3, 2)}


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name].cpu(), right[name].cpu()), name


def test_round_checkpoint_is_plain_without_a_key_ring(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "round-0001.pt"
    save_adapter_state(_state(), path)
    _assert_same(torch.load(path, weights_only=True), _state())
    _assert_same(load_adapter_state_file(path), _state())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0001.pt"]


def test_round_checkpoint_is_encrypted_and_tampering_is_detected(tmp_path, keyring, monkeypatch):
    first, second = tmp_path / "round-0001.pt", tmp_path / "round-0002.pt"
    save_adapter_state(_state(), first)
    save_adapter_state({k: v * 2 for k, v in _state().items()}, second)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(first, weights_only=True)
    _assert_same(load_adapter_state_file(first), _state())

    blob = bytearray(first.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    first.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        load_adapter_state_file(first)

    # Moving round 2's ciphertext under round 1's name is caught: it is bound to its name.
    first.write_bytes(second.read_bytes())
    with pytest.raises(IntegrityError):
        load_adapter_state_file(first)

    # Planting a plaintext checkpoint where ciphertext is expected is refused too.
    torch.save(_state(), first)
    with pytest.raises(IntegrityError, match="plaintext"):
        load_adapter_state_file(first)

    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(EncryptionError, match="encrypted"):
        load_adapter_state_file(second)


def test_adapter_directory_is_served_encrypted_and_refused_when_tampered(
    tmp_path, lora_model, keyring
):
    directory = tmp_path / "checkpoint"
    save_adapter_directory(lora_model, directory)
    assert not (tmp_path / "checkpoint.staging").exists()
    weights = directory / "adapter_model.safetensors"
    assert b"lora_A" not in weights.read_bytes()
    assert b"peft_type" not in (directory / "adapter_config.json").read_bytes()

    loaded = read_adapter(directory)
    _assert_same(loaded.state, get_peft_model_state_dict(lora_model))

    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(AdapterLoadError, match="unreadable adapter"):
        read_adapter(directory)


def test_adapter_directory_without_key_ring_is_plain_peft(tmp_path, lora_model, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    directory = tmp_path / "checkpoint"
    save_adapter_directory(lora_model, directory)
    assert b"peft_type" in read_artifact(directory / "adapter_config.json")
    _assert_same(read_adapter(directory).state, get_peft_model_state_dict(lora_model))
