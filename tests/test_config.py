"""The YAML schema: shipped configs validate, overrides apply, mistakes give precise messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.config import ConfigError, load_config, validate_config

# Node, router and hospital files have their own schemas, tested with their servers.
SERVICE_CONFIGS = {"node.yaml", "router.yaml", "hospital.yaml"}
CONFIGS = sorted(
    path
    for path in (Path(__file__).parents[1] / "configs").glob("*.yaml")
    if path.name not in SERVICE_CONFIGS
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.federation.cohort_size <= config.federation.num_hospitals
    assert len(config.federation.profiles()) == config.federation.num_hospitals


def test_overrides_are_typed_and_nested(tmp_path):
    file = tmp_path / "x.yaml"
    file.write_text("run: {rounds: 2}\n")
    config = load_config(
        file,
        ["training.local_steps=7", "privacy.enabled=false", "evaluation.baselines=[]"],
    )
    assert config.training.local_steps == 7
    assert config.privacy.enabled is False
    assert config.evaluation.baselines == []
    assert config.run.rounds == 2


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"training": {"local_stepz": 3}}, ["training.local_stepz", "unknown key", "3"]),
        ({"privacy": {"delta": 2}}, ["privacy.delta", "got 2", "less than 1"]),
        ({"privacy": {"accountant": "clt"}}, ["privacy.accountant", "'clt'", "'pld'"]),
        ({"federation": {"num_hospitals": 2, "cohort_size": 5}}, ["cohort_size (5)", "<= "]),
        (
            {
                "federation": {
                    "num_hospitals": 1,
                    "hospitals": [{"name": "a", "specialty_mix": {"x": 1}}],
                }
            },
            ["unknown specialty ['x']", "cardiology"],
        ),
        (
            {"privacy": {"target_epsilon": 4, "noise_multiplier": 1.0}},
            ["exactly one of privacy.target_epsilon"],
        ),
        ({"data": {"source": "jsonl"}}, ["data.path is required"]),
        ({"run": {"rounds": 0}}, ["run.rounds", "got 0", "greater than 0"]),
    ],
)
def test_errors_name_key_value_and_expectation(raw, fragments):
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(CONFIGS[0], ["no-equals-sign"])


def test_file_data_refuses_synthetic_only_profile_keys_and_unpaired_column_keys():
    base = {
        "federation": {"num_hospitals": 1, "cohort_size": 1, "hospitals": [{"name": "a"}]},
        "data": {"source": "jsonl", "path": "x.jsonl"},
    }
    assert validate_config(base).data.source == "jsonl"
    sized = {
        **base,
        "federation": {**base["federation"], "hospitals": [{"name": "a", "data_size": 5}]},
    }
    with pytest.raises(ConfigError, match=r"federation\.hospitals\.0\.data_size shapes synthetic"):
        validate_config(sized)
    mixed = {
        **base,
        "federation": {**base["federation"], "hospitals": [{"name": "a", "specialty_mix": {}}]},
    }
    with pytest.raises(ConfigError, match="specialty_mix shapes synthetic data only"):
        validate_config(mixed)
    with pytest.raises(ConfigError, match="hospital_field go together"):
        validate_config({**base, "data": {**base["data"], "partition": "column"}})
    with pytest.raises(ConfigError, match="needs file data"):
        validate_config({"data": {"partition": "column", "hospital_field": "site"}})
