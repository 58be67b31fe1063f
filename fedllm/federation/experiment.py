"""How a Flower app finds its experiment: the ``run_config`` keys shared by server and clients.

``config-file`` names the YAML (a relative path resolves against the app's own directory first,
which is where a Flower App Bundle unpacks what the researcher submitted, then against the
working directory: a same-named file next to a hospital's SuperNode or the SuperLink can never
replace the researcher's), and
``overrides`` carries ``section.key=value`` pairs separated by ``;`` so that
``flwr run . -c "overrides='training.local_steps=2'"`` works like ``fedllm run --set``.

The common hyper-parameters also have keys of their own, as Flower apps usually do
(``flwr run . -c "num-server-rounds=5 learning-rate=0.01"``): :data:`FLOWER_KEYS`. Their
defaults in ``pyproject.toml`` are 0, a value no experiment accepts, meaning "as the YAML says";
any other value overrides the YAML (and ``overrides``). The YAML stays the full experiment.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedllm.config import ExperimentConfig, load_config

APP_ROOT = Path(__file__).resolve().parents[2]


def resolve_config_path(path: str, app_root: Path = APP_ROOT) -> Path:
    """An absolute path as given; a relative one in the app's bundle, else the working directory.

    ``app_root`` is the directory of the running Flower app (its FAB), which ServerApp and
    ClientApp pass in; the default is this package's own checkout.
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    bundled = app_root / candidate
    if bundled.exists() or not candidate.exists():
        return bundled
    return candidate


# Flower run-config key -> the experiment key it sets (0 in pyproject.toml: keep the YAML's).
FLOWER_KEYS = {
    "num-server-rounds": "run.rounds",
    "local-steps": "training.local_steps",
    "learning-rate": "training.learning_rate",
    "target-epsilon": "privacy.target_epsilon",
    "cohort-size": "federation.cohort_size",
}


def flower_key_overrides(run_config: Mapping[str, object]) -> list[str]:
    """``section.key=value`` for every Flower key set to something other than its 0 default."""
    overrides = []
    for key, target in FLOWER_KEYS.items():
        value = run_config.get(key, 0)
        if isinstance(value, bool) or value in (0, 0.0, ""):
            continue
        overrides.append(f"{target}={value}")
    return overrides


def split_overrides(text: str) -> list[str]:
    """``a.b=1; c.d=x`` -> ``["a.b=1", "c.d=x"]``."""
    return [part.strip() for part in text.split(";") if part.strip()]


def experiment_from_run_config(
    run_config: Mapping[str, object], app_root: Path = APP_ROOT
) -> ExperimentConfig:
    """Load the experiment both the ServerApp and every ClientApp of a run agree on."""
    path = resolve_config_path(str(run_config.get("config-file", "configs/default.yaml")), app_root)
    overrides = split_overrides(str(run_config.get("overrides", "")))
    return load_config(path, [*overrides, *flower_key_overrides(run_config)])
