"""How a Flower app finds its experiment: the ``run_config`` keys shared by server and clients.

``config-file`` names the YAML (relative paths resolve against the working directory, then
against the app's own directory, which is where a deployed Flower App Bundle unpacks it), and
``overrides`` carries ``section.key=value`` pairs separated by ``;`` so that
``flwr run . -c "overrides='training.local_steps=2'"`` works like ``fedllm run --set``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedllm.config import ExperimentConfig, load_config

APP_ROOT = Path(__file__).resolve().parents[2]


def resolve_config_path(path: str, app_root: Path = APP_ROOT) -> Path:
    """The config file as given if it exists, else relative to the app's root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return app_root / candidate


def split_overrides(text: str) -> list[str]:
    """``a.b=1; c.d=x`` -> ``["a.b=1", "c.d=x"]``."""
    return [part.strip() for part in text.split(";") if part.strip()]


def experiment_from_run_config(
    run_config: Mapping[str, object], app_root: Path = APP_ROOT
) -> ExperimentConfig:
    """Load the experiment both the ServerApp and every ClientApp of a run agree on."""
    path = resolve_config_path(str(run_config.get("config-file", "configs/default.yaml")), app_root)
    return load_config(path, split_overrides(str(run_config.get("overrides", ""))))
