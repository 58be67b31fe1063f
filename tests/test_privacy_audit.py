"""fedllm privacy audit: the bounds against worked examples, and power, soundness and a broken
build caught on a tiny federation (one hospital, a 1-layer GPT-2, SGD, ε = 1)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedllm.audit.attacks import auc, loss_threshold_auc
from fedllm.audit.bounds import (
    audit_one_run,
    clopper_pearson_upper,
    many_run_audit,
    many_run_epsilon,
    one_run_epsilon,
    one_run_p_value,
)
from fedllm.audit.canaries import CANARY_PREFIX, TextCanaries, calibrated_log_probs
from fedllm.audit.run import run_audit
from fedllm.cli.app import app
from fedllm.config.loading import validate_config
from fedllm.models.loading import load_lora_model, load_tokenizer
from fedllm.training.local import DpSgdSettings, train_locally

CANARIES = 128
# The black-box power setting: few canaries per run (each then owns more of the rank-4
# adapter and is drawn more often), pooled over 8 runs (64 slots), trained longer and faster
# than the white-box one. Without DP, five trials gave AUC 0.84-0.93 and bounds 0.17-0.94.
BLACKBOX_CANARIES = 8
BLACKBOX_RUNS = 8
BLACKBOX_CONFIDENCE = 0.999
BLACKBOX_TRAINING = {"local_steps": 20, "learning_rate": 1.0}


def _raw_config(model_dir: str, output_dir: str) -> dict:
    return {
        "run": {"name": "tiny", "rounds": 2, "output_dir": output_dir},
        "federation": {
            "num_hospitals": 1,
            "cohort_size": 1,
            "hospitals": [{"name": "a", "data_size": 80}],
        },
        "model": {"name": model_dir, "max_seq_length": 32, "lora": {"r": 4}},
        "training": {"local_steps": 10, "batch_size": 32, "learning_rate": 0.5, "optimizer": "sgd"},
        "privacy": {"target_epsilon": 1.0},
        "evaluation": {"release": "off", "baselines": []},
        "strategy": {"selection": "random"},
    }


def _noise_scaled_down_tenfold(model, data, *, dp, **kwargs):
    """A deliberately broken build: trains with σ/10 while the plan reports the ε of σ."""
    if dp is not None:
        dp = DpSgdSettings(dp.noise_multiplier / 10, dp.max_grad_norm)
    return train_locally(model, data, dp=dp, **kwargs)


@pytest.fixture(scope="module")
def tiny_config(local_model_dir, tmp_path_factory):
    return validate_config(_raw_config(local_model_dir, str(tmp_path_factory.mktemp("runs"))))


@pytest.fixture(scope="module")
def whitebox(tiny_config):
    return run_audit(tiny_config, mode="whitebox", canaries=CANARIES)


def test_bound_matches_the_hand_worked_pure_dp_example():
    # 10 of 10 guesses right: under ε-DP each is right w.p. at most p = e^ε/(1+e^ε), so
    # P[all right] = p^10 < 0.05 exactly when p > 0.05^(1/10) = 0.74113, i.e.
    # ε > ln(0.74113 / 0.25887) = 1.05187.
    assert one_run_epsilon(10, 10, 10, 0.0, 0.95) == pytest.approx(1.05187, abs=1e-4)
    # 1000 of 1000: p > 0.05^(1/1000) = 0.997009, ε > ln(0.997009 / 0.002991) = 5.809
    assert one_run_epsilon(1000, 1000, 1000, 0.0, 0.95) == pytest.approx(5.809, abs=1e-3)


def test_delta_term_matches_the_theorem_on_a_small_case():
    # m = r = v = 2: β = q², and max over i of P[2 - i <= W < 2] / i is
    # max(2q(1 - q), (1 - q²) / 2), times 2mδ = 4δ.
    epsilon, delta = 0.7, 0.01
    q = 1 / (1 + math.exp(-epsilon))
    expected = q**2 + 4 * delta * max(2 * q * (1 - q), (1 - q**2) / 2)
    assert one_run_p_value(2, 2, 2, epsilon, delta) == pytest.approx(expected)


def test_bound_edge_cases_and_monotonicity():
    assert one_run_epsilon(100, 50, 0, 1e-5, 0.95) == 0.0
    assert one_run_epsilon(100, 50, 25, 1e-5, 0.95) == 0.0  # chance level proves nothing
    more = [one_run_epsilon(200, 100, v, 1e-5, 0.95) for v in (60, 70, 80, 90, 100)]
    assert more == sorted(more)
    assert more[0] < more[-1]
    assert one_run_epsilon(200, 100, 90, 1e-5, 0.99) < one_run_epsilon(200, 100, 90, 1e-5, 0.9)
    assert one_run_epsilon(200, 100, 90, 1e-3, 0.95) < one_run_epsilon(200, 100, 90, 0.0, 0.95)
    with pytest.raises(ValueError, match="guesses"):
        one_run_p_value(10, 20, 5, 1.0, 0.0)


def test_clopper_pearson_many_run_bound_by_hand():
    # no errors in 1000 trials: the one-sided upper bound at 97.5% is 1 - 0.025^(1/1000)
    upper = 1 - 0.025 ** (1 / 1000)
    assert clopper_pearson_upper(0, 1000, 0.975) == pytest.approx(upper, rel=1e-6)
    expected = math.log((1 - 1e-5 - upper) / upper)
    assert many_run_epsilon(0, 1000, 0, 1000, 1e-5, 0.95) == pytest.approx(expected, rel=1e-6)
    assert many_run_epsilon(500, 1000, 500, 1000, 1e-5, 0.95) == 0.0


def test_many_run_audit_thresholds_pooled_scores():
    # perfectly separated, 500 in and 500 out: the median threshold makes no error, and each
    # of the 5 thresholds is tested at 1 - 0.05/5 = 99%
    included = np.arange(1000) < 500
    scores = included.astype(float)
    expected = many_run_epsilon(0, 500, 0, 500, 1e-5, 0.99)
    assert many_run_audit(scores, included, 1e-5, 0.95) == pytest.approx(expected)
    assert expected > 4.0
    rng = np.random.default_rng(1)
    assert many_run_audit(rng.normal(size=1000), included, 1e-5, 0.95) < 0.5
    with pytest.raises(ValueError, match="both included and excluded"):
        many_run_audit(scores[:500], included[:500], 1e-5, 0.95)


def test_one_run_audit_separates_only_what_is_separated():
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    noise = rng.normal(size=400)
    separated = audit_one_run(noise + 4 * included, included, 1e-5, 0.95)
    assert separated.epsilon > 2.0
    assert separated.correct == separated.guesses
    assert audit_one_run(noise, included, 1e-5, 0.95).epsilon < 0.5


def test_auc_by_hand():
    assert auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert auc([1, 1], [True, False]) == 0.5
    assert loss_threshold_auc(np.array([0.1, 0.2]), np.array([0.3, 0.05])) == 0.5


def test_whitebox_power_without_dp(whitebox):
    # 128 canaries spread over 3 coordinates each: every guess right so far (bound 2.9, the
    # most 128 canaries can show, and AUC 1.0 in 3 trials)
    row = whitebox["summary"]["no_dp"]["a"]
    assert row["epsilon_lower_bound"] > 2.0
    assert row["canary_auc"] > 0.95
    assert row["reported_epsilon"] is None


def test_whitebox_soundness_with_dp(whitebox):
    row = whitebox["summary"]["dp"]["a"]
    assert row["reported_epsilon"] == pytest.approx(1.0, abs=0.01)
    assert row["epsilon_lower_bound"] <= row["reported_epsilon"]
    result = whitebox["runs"]["dp"]["a"]
    assert result["canaries"] == CANARIES
    assert len(result["scores"]) == CANARIES
    assert 0.0 <= result["membership_auc"] <= 1.0


def test_noise_scaled_down_tenfold_is_caught(tiny_config):
    broken = run_audit(
        tiny_config,
        mode="whitebox",
        canaries=CANARIES,
        baseline=False,
        trainer=_noise_scaled_down_tenfold,
    )
    row = broken["summary"]["dp"]["a"]
    assert row["epsilon_lower_bound"] > row["reported_epsilon"]


def test_independent_runs_pool_their_canaries(tiny_config):
    audit = run_audit(tiny_config, mode="whitebox", canaries=64, runs=2)
    assert audit["independent_runs"] == 2
    dp, no_dp = audit["runs"]["dp"]["a"], audit["runs"]["no_dp"]["a"]
    assert dp["canaries"] == len(dp["scores"]) == 128
    assert len(dp["per_run_epsilon_lower_bound"]) == 2
    row = audit["summary"]["dp"]["a"]
    assert row["epsilon_lower_bound"] <= row["reported_epsilon"]
    assert row["many_run_epsilon_lower_bound"] <= row["reported_epsilon"]
    assert audit["summary"]["no_dp"]["a"]["many_run_epsilon_lower_bound"] > 1.0
    assert no_dp["epsilon_lower_bound"] > 1.0


def test_text_canaries_are_records_of_one_distinct_secret_token(tokenizer):
    canaries = TextCanaries.draw(20, tokenizer, 32)
    prefix = tokenizer(CANARY_PREFIX)["input_ids"]
    assert canaries.pairs.input_ids.shape == (40, 32)
    assert bool(canaries.pairs.attention_mask.all())
    assert canaries.pairs.input_ids[:, : len(prefix)].tolist() == [prefix] * 40
    secrets = torch.cat((canaries.pairs.input_ids, canaries.references.input_ids))[:, len(prefix) :]
    assert bool((secrets == secrets[:, :1]).all())  # one token fills each record
    tokens = secrets[:, 0].tolist()
    assert len(set(tokens)) == len(tokens) == 40 + 255  # no token trains two candidates
    assert not set(tokens) & set(tokenizer.all_special_ids)
    planted = canaries.planted().input_ids[:, -1]
    first, second = canaries.pairs.input_ids[0::2, -1], canaries.pairs.input_ids[1::2, -1]
    assert (
        planted.tolist() == torch.where(torch.from_numpy(canaries.included), first, second).tolist()
    )
    with pytest.raises(ValueError, match="needs 600 distinct secret tokens"):
        TextCanaries.draw(300, tokenizer, 32)


def test_calibration_is_against_the_base_model(tiny_config):
    # A fresh adapter is the base model (LoRA's B starts at 0): nothing is left after the
    # calibration. Once the adapter moves, the final model differs from the base model the
    # calibration disables the adapter to get, and evidence appears.
    model = load_lora_model(tiny_config.model, torch.device("cpu"), 0)
    canaries = TextCanaries.draw(8, load_tokenizer(tiny_config.model), 32)
    assert np.abs(calibrated_log_probs(model, canaries.pairs)).max() < 1e-9
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    assert np.abs(calibrated_log_probs(model, canaries.pairs)).max() > 1e-3


@pytest.fixture(scope="module")
def blackbox(local_model_dir, tmp_path_factory):
    raw = _raw_config(local_model_dir, str(tmp_path_factory.mktemp("runs")))
    raw["training"] |= BLACKBOX_TRAINING
    return run_audit(
        validate_config(raw),
        mode="blackbox",
        canaries=BLACKBOX_CANARIES,
        runs=BLACKBOX_RUNS,
        confidence=BLACKBOX_CONFIDENCE,
    )


def test_blackbox_power_without_dp(blackbox):
    # A bound above 0 at 99.9% confidence: scores that carry nothing about the coins (an
    # attack that learned nothing) pass this with probability at most 0.001.
    row = blackbox["summary"]["no_dp"]["a"]
    assert row["epsilon_lower_bound"] > 0.0
    assert row["canary_auc"] > 0.75
    assert blackbox["runs"]["no_dp"]["a"]["canaries"] == BLACKBOX_CANARIES * BLACKBOX_RUNS


def test_blackbox_soundness_with_dp(blackbox):
    row = blackbox["summary"]["dp"]["a"]
    assert row["epsilon_lower_bound"] <= row["reported_epsilon"]
    assert row["many_run_epsilon_lower_bound"] <= row["reported_epsilon"]


def test_cli_blackbox_writes_audit_json_and_plot(local_model_dir, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_raw_config(local_model_dir, str(tmp_path / "runs"))))
    result = CliRunner().invoke(
        app,
        ["privacy", "audit", str(config), "--mode", "blackbox", "--canaries", "64", "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    run_dir = tmp_path / "runs" / "tiny-audit"
    assert summary["run_dir"] == str(run_dir)
    written = json.loads((run_dir / "audit.json").read_text())
    exposure = written["runs"]["dp"]["a"]["exposure"]
    assert 0.0 <= exposure["planted_mean"] <= math.log2(256)
    assert set(written["summary"]) == {"dp", "no_dp"}
    dp = written["summary"]["dp"]["a"]
    assert dp["epsilon_lower_bound"] <= dp["reported_epsilon"]
    assert (run_dir / "audit.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "greybox"], "--mode: got 'greybox'"),
        (["--hospital", "nowhere"], "--hospital 'nowhere' is not in this config"),
        (["--canaries", "1"], "--canaries: got 1"),
        (["--runs", "0"], "--runs: got 0"),
        (["--mode", "blackbox", "--canaries", "300"], "needs 600 distinct secret tokens"),
        (["--canaries", "600"], "needs 600 of the 512 trainable parameters"),
    ],
)
def test_cli_user_mistakes_are_one_line_errors(local_model_dir, tmp_path, extra, message):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_raw_config(local_model_dir, str(tmp_path / "runs"))))
    result = CliRunner().invoke(app, ["privacy", "audit", str(config), *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
