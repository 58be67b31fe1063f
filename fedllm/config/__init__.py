"""Experiment configuration: the pydantic schema of the YAML files and how they are loaded."""

from fedllm.config.loading import ConfigError, dump_config, load_config, validate_config
from fedllm.config.schema import ExperimentConfig, HospitalProfile

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "HospitalProfile",
    "dump_config",
    "load_config",
    "validate_config",
]
