"""How a Flower run gets its experiment: parsed once where the run starts, then passed as data.

``fedllm run`` validates the YAML and its ``--set`` overrides, runs the preflight checks, and
passes the result to the ServerApp as :data:`EXPERIMENT`: the resolved config as canonical JSON
(:func:`experiment_json`). The ServerApp takes it as it is, and puts the same JSON into every
message it sends, so each ClientApp rebuilds the experiment from the message
(:func:`experiment_from_message`): no hospital reads a YAML file, applies an override or resolves
a path. A hospital's own settings (its cap, ledger, records) stay in its node config.

A researcher who starts the ServerApp with a plain ``flwr run`` passes no :data:`EXPERIMENT`;
the ServerApp then reads the YAML itself (:func:`experiment_from_run_config`). ``config-file``
names the YAML (a relative path resolves against the app's own directory first,
which is where a Flower App Bundle unpacks what the researcher submitted, then against the
working directory: a same-named file next to the SuperLink can never replace the
researcher's), and
``overrides`` carries ``section.key=value`` pairs separated by ``;`` so that
``flwr run . -c "overrides='training.local_steps=2'"`` works like ``fedllm run --set``.

The common hyper-parameters also have keys of their own, as Flower apps usually do
(``flwr run . -c "num-server-rounds=5 learning-rate=0.01"``): :data:`FLOWER_KEYS`. Their
defaults in ``pyproject.toml`` are 0, a value no experiment accepts, meaning "as the YAML says";
any other value overrides the YAML (and ``overrides``). The YAML stays the full experiment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from fedllm.config import ConfigError, ExperimentConfig, load_config, validate_config

APP_ROOT = Path(__file__).resolve().parents[2]
# run-config key (from `fedllm run`) and message key (to hospitals): the resolved experiment
EXPERIMENT = "experiment"


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
    """The experiment a plain ``flwr run`` names: its YAML, ``overrides`` and Flower keys.

    Only the ServerApp calls this, and only without :data:`EXPERIMENT`; hospitals get the
    result from its messages.
    """
    path = resolve_config_path(str(run_config.get("config-file", "configs/default.yaml")), app_root)
    overrides = split_overrides(str(run_config.get("overrides", "")))
    return load_config(path, [*overrides, *flower_key_overrides(run_config)])


def experiment_json(config: ExperimentConfig) -> str:
    """The resolved experiment as canonical JSON (sorted keys, no spaces, ASCII, no ``'``).

    No ``'``: Flower's ``--run-config`` parser takes a value in single quotes verbatim but
    allows none inside, and JSON may spell ``'`` as ``\\u0027`` (it occurs only in strings).
    """
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return text.replace("'", "\\u0027")


def experiment_from_json(text: str, source: str) -> ExperimentConfig:
    """Rebuild an experiment from :func:`experiment_json`; validated like any config."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}: the experiment is not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the experiment is not a JSON object")
    return validate_config(raw, source=source)


def given_experiment(run_config: Mapping[str, object]) -> ExperimentConfig | None:
    """The resolved experiment ``fedllm run`` passed; None under a plain ``flwr run``.

    It is final: overrides or Flower keys beside it would make the run differ from the
    ``config.yaml`` the CLI recorded, so they are refused rather than ignored.
    """
    text = str(run_config.get(EXPERIMENT, ""))
    if not text:
        return None
    extra = [
        *split_overrides(str(run_config.get("overrides", ""))),
        *flower_key_overrides(run_config),
    ]
    if extra:
        raise ConfigError(
            f"run config: '{EXPERIMENT}' is already resolved; got overrides {extra} beside it "
            "(pass them to `fedllm run --set` instead)"
        )
    return experiment_from_json(text, source=f"run config '{EXPERIMENT}'")


def experiment_from_message(config: Mapping[str, object]) -> ExperimentConfig:
    """The experiment a ServerApp message carries (its ``config`` record), for a ClientApp."""
    if EXPERIMENT not in config:
        raise ConfigError(
            f"the server's message carries no '{EXPERIMENT}': the server runs another fedllm "
            "version than this hospital"
        )
    return experiment_from_json(str(config[EXPERIMENT]), source=f"message '{EXPERIMENT}'")
