"""DP noise and sampling are secret and fresh: nothing in the config reproduces them.

The LoRA ``B`` matrices start at zero, so in the first SGD step from a fresh adapter every
``lora_A`` gradient is exactly zero and the step moves ``lora_A`` by ``-lr · noise / B``: the
hospital's DP noise, read off the real training path.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fedllm.config import validate_config
from fedllm.federation.hospital import HospitalSite
from fedllm.models.adapters import adapter_state
from fedllm.privacy.randomness import FastStream, SecureStream, SeededStream, fresh_stream

SEED = 11


def _config(model_dir: str, **privacy):
    return validate_config(
        {
            "run": {"rounds": 2, "seed": SEED},
            "federation": {"num_hospitals": 2, "cohort_size": 2},
            "model": {"name": model_dir, "max_seq_length": 16, "lora": {"r": 48, "alpha": 48.0}},
            "training": {
                "local_steps": 1,
                "batch_size": 8,
                "learning_rate": 1.0,
                "optimizer": "sgd",
            },
            "privacy": {"noise_multiplier": 1.0, "target_epsilon": None, **privacy},
            "evaluation": {"baselines": [], "release": "off"},
        }
    )


def _step_noise(site: HospitalSite, server_round: int) -> np.ndarray:
    """The noise of one DP-SGD step on the lora_A matrices, in units of σC."""
    start = adapter_state(site.model)
    outcome = site.train_round(start, server_round=server_round, run_id="run")
    moved = [
        (start[name] - outcome.adapter[name]).flatten()
        for name in sorted(start)
        if "lora_A" in name
    ]
    expected_batch = site.plan.sample_rate * len(site.train_data)
    clip = site.config.privacy.max_grad_norm
    return (torch.cat(moved) * expected_batch / (site.plan.noise_multiplier * clip)).numpy()


@pytest.fixture
def site(local_model_dir, tmp_path) -> HospitalSite:
    return HospitalSite(_config(local_model_dir), 1, f"sqlite:///{tmp_path / 'ledger.db'}")


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_step_noise_is_standard_normal_and_fresh_every_round(site):
    first, second = _step_noise(site, 1), _step_noise(site, 2)
    assert first.size > 1000
    for noise in (first, second):
        assert noise.std() == pytest.approx(1.0, rel=0.1)
        assert abs(noise.mean()) < 0.1
    # consecutive rounds of one hospital: independent, so nothing cancels when subtracted
    assert abs(_correlation(first, second)) < 0.1


def test_noise_cannot_be_regenerated_from_any_config_value(site):
    noise = _step_noise(site, 1)
    config = site.config
    candidates = {
        config.run.seed,
        config.run.seed * 1000 + site.index,
        config.run.seed + 1,
        site.index,
        1,
        *range(64),
        int.from_bytes(hashlib.sha256(f"{SEED}/1/1/run".encode()).digest()[:4], "big"),
    }
    for seed in candidates:
        torch.manual_seed(seed)
        global_draw = torch.randn(noise.size).numpy()
        seeded_draw = SeededStream(seed).normal(
            (noise.size,), 1.0, device=torch.device("cpu"), dtype=torch.float64
        )
        for draw in (global_draw, seeded_draw.numpy()):
            assert abs(_correlation(noise, draw)) < 0.1


def test_building_a_site_leaves_torch_global_generator_as_it_found_it(local_model_dir, tmp_path):
    """The LoRA initialisation follows run.seed; nothing after it may (a warm worker builds a
    site once and trains for many rounds in the same process)."""
    torch.manual_seed(12345)
    before = torch.random.get_rng_state()
    HospitalSite(_config(local_model_dir), 0, f"sqlite:///{tmp_path / 'a.db'}")
    assert torch.equal(torch.random.get_rng_state(), before)


def test_two_hospitals_with_the_same_config_draw_different_noise(local_model_dir, tmp_path):
    config = _config(local_model_dir)
    one = HospitalSite(config, 0, f"sqlite:///{tmp_path / 'a.db'}")
    two = HospitalSite(config, 1, f"sqlite:///{tmp_path / 'b.db'}")
    assert abs(_correlation(_step_noise(one, 1), _step_noise(two, 1))) < 0.1


def test_two_runs_of_one_config_in_two_processes_give_different_adapters(local_model_dir, tmp_path):
    """Deployment starts a process per message: each must draw its own noise."""
    script = textwrap.dedent(
        f"""
        import hashlib, sys
        import torch
        from fedllm.config import validate_config
        from fedllm.federation.hospital import HospitalSite
        from fedllm.models.adapters import adapter_state
        config = validate_config({_config(local_model_dir).model_dump(mode="json")!r})
        site = HospitalSite(config, 0, "sqlite:///" + sys.argv[1])
        adapter = site.train_round(adapter_state(site.model), 1, "run").adapter
        digest = hashlib.sha256()
        for name in sorted(adapter):
            digest.update(adapter[name].numpy().tobytes())
        print(digest.hexdigest())
        """
    )
    digests = [
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"ledger-{i}.db")],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        .stdout.strip()
        .splitlines()[-1]
        for i in range(2)
    ]
    assert len(digests[0]) == 64
    assert digests[0] != digests[1]


@pytest.mark.parametrize("stream_type", [FastStream, SecureStream])
def test_streams_draw_standard_gaussians_and_uniforms(stream_type):
    stream = stream_type()
    normal = stream.normal((200_000,), 2.0, device=torch.device("cpu"), dtype=torch.float64)
    assert normal.std().item() == pytest.approx(2.0, rel=0.01)
    assert abs(normal.mean().item()) < 0.02
    # tails as a Gaussian's: P(|z| > 3) = 0.0027
    assert float((normal.abs() > 6.0).double().mean()) == pytest.approx(0.0027, rel=0.2)
    uniform = stream.uniform(200_000)
    assert float(uniform.min()) >= 0.0
    assert float(uniform.max()) < 1.0
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.005)
    mask = stream.poisson_mask(100_000, 0.05)
    assert float(mask.double().mean()) == pytest.approx(0.05, rel=0.05)


def test_fresh_streams_differ_and_the_source_is_checked():
    draws = [fresh_stream("fast").uniform(8) for _ in range(2)]
    draws += [fresh_stream("secure").uniform(8) for _ in range(2)]
    assert len({tuple(d.tolist()) for d in draws}) == 4
    with pytest.raises(ValueError, match="random_source"):
        fresh_stream("seeded")


def test_secure_source_trains(local_model_dir, tmp_path):
    config = _config(local_model_dir, random_source="secure")
    site = HospitalSite(config, 0, f"sqlite:///{tmp_path / 'ledger.db'}")
    assert _step_noise(site, 1).std() == pytest.approx(1.0, rel=0.1)
