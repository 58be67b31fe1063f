"""Adapter checkpoints at rest: plaintext without a key ring, AES-GCM with one, tamper-evident."""

from __future__ import annotations

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
from fedllm.security.encryption import (
    ENV_VAR,
    EncryptionError,
    IntegrityError,
    KeyRing,
    save_torch_encrypted,
)
from fedllm.serving.node.generation import AdapterLoadError, read_adapter

MODEL = ModelConfig.model_validate({**TINY_TEST_MODEL, "lora": {"r": 2, "alpha": 4.0}})
ROUND_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def lora_model():
    return randomised_lora_model(MODEL, seed=1)


@pytest.fixture(scope="module")
def writer():
    """The ServerApp's round-checkpoint writer, on a model of its own (it overwrites it)."""
    return adapter_directory_writer(load_lora_model(MODEL, torch.device("cpu"), seed=0))


@pytest.fixture
def keyring(monkeypatch) -> KeyRing:
    ring = KeyRing.generate()
    monkeypatch.setenv(ENV_VAR, ring.to_json())
    return ring


def _state(seed: int) -> dict[str, torch.Tensor]:
    """A global adapter as the strategy holds it: random, distinct from a fresh adapter."""
    return adapter_state(randomised_lora_model(MODEL, seed=seed))


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name].cpu(), right[name].cpu()), name


def test_round_checkpoint_is_a_peft_directory_without_a_key_ring(tmp_path, writer, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    state = _state(seed=2)
    directory = tmp_path / "checkpoints" / "round-0001"
    writer(state, directory)
    assert sorted(p.name for p in directory.iterdir()) == ROUND_FILES
    assert sorted(p.name for p in directory.parent.iterdir()) == ["round-0001"]  # no staging
    # what resume reads back is bit-identical to what the strategy handed over, and so is the
    # global adapter it restarts from (as run_federation loads it into a fresh model)
    _assert_same(load_round_checkpoint(directory), state)
    resumed = load_lora_model(MODEL, torch.device("cpu"), seed=5)
    load_adapter_state(resumed, load_round_checkpoint(directory))
    _assert_same(adapter_state(resumed), state)
    # and it is an ordinary peft adapter
    loaded = PeftModel.from_pretrained(load_base_model(MODEL, torch.device("cpu")), directory)
    _assert_same(adapter_state(loaded), state)


def test_round_checkpoint_is_encrypted_and_tampering_is_detected(
    tmp_path, writer, keyring, monkeypatch
):
    state = _state(seed=3)
    first = tmp_path / "checkpoints" / "round-0001"
    writer(state, first)
    assert sorted(p.name for p in first.iterdir()) == ROUND_FILES
    weights = first / "adapter_model.safetensors"
    assert b"lora_A" not in weights.read_bytes()
    assert b"peft_type" not in (first / "adapter_config.json").read_bytes()
    _assert_same(load_round_checkpoint(first), state)

    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        load_round_checkpoint(first)

    # Planting a plaintext adapter where ciphertext is expected is refused too.
    monkeypatch.delenv(ENV_VAR)
    plain = tmp_path / "plain"
    writer(state, plain)
    weights.write_bytes((plain / "adapter_model.safetensors").read_bytes())
    monkeypatch.setenv(ENV_VAR, keyring.to_json())
    with pytest.raises(IntegrityError, match="plaintext"):
        load_round_checkpoint(first)

    second = tmp_path / "checkpoints" / "round-0002"
    writer(state, second)
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(EncryptionError, match="encrypted"):
        load_round_checkpoint(second)


def test_round_checkpoints_of_older_runs_are_still_read(tmp_path, keyring, monkeypatch):
    """Runs from before round checkpoints were peft directories recorded round-NNNN.pt."""
    state = _state(seed=4)
    encrypted = tmp_path / "round-0001.pt"
    save_torch_encrypted(state, encrypted, keyring)
    _assert_same(load_round_checkpoint(encrypted), state)

    monkeypatch.delenv(ENV_VAR)
    plain = tmp_path / "round-0002.pt"
    torch.save(state, plain)
    _assert_same(load_round_checkpoint(plain), state)

    with pytest.raises(FileNotFoundError, match="no round checkpoint"):
        load_round_checkpoint(tmp_path / "round-0003")


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
