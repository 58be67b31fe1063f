"""Read a YAML experiment, apply ``key=value`` overrides and validate it into an ExperimentConfig.

Every failure a user can cause (missing file, bad YAML, unknown key, bad value) becomes one
``ConfigError`` whose message names the key, the value and what was expected, so the CLI can
print it in one line instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fedllm.config.schema import ExperimentConfig

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A user-facing configuration problem."""


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Load ``path``, apply ``overrides`` (``section.key=value``, YAML-typed) and validate."""
    raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, source=str(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping, turning I/O and syntax problems into ConfigError."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: invalid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of sections at the top level")
    return data


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set a dotted key in the raw mapping; the value is YAML (``3``, ``true``, ``[a]``)."""
    key, separator, text = override.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"override '{override}' must look like section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def validate_config(raw: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate an experiment mapping (see `validate_model`)."""
    return validate_model(ExperimentConfig, raw, source, what="config")


def validate_model(
    model: type[M], raw: Mapping[str, Any], source: str, *, what: str = "config"
) -> M:
    """Validate any YAML-backed schema, rewording pydantic's errors as 'key: got value; expected'.

    Every fedllm YAML file (experiment, node, router, hospital) goes through here so that a
    user sees one wording for every mistake, whichever file they got wrong.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        lines = [describe_error(item) for item in error.errors()]
        raise ConfigError(f"{source}: invalid {what}\n  " + "\n  ".join(lines)) from None


def dump_config(config: ExperimentConfig, path: Path) -> None:
    """Write the fully resolved config (defaults included) so a run can be reproduced exactly."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "utf-8")


def describe_error(item: Mapping[str, Any]) -> str:
    """One pydantic error as 'key: got value; expected: ...' (or 'unknown key')."""
    key = ".".join(str(part) for part in item["loc"]) or "(top level)"
    if item["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {item['input']!r}); check the spelling"
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "value_error" and isinstance(item["input"], Mapping):
        # a section's own cross-key check: its message names the keys, echoing the whole
        # section (or the whole file) would bury it
        return message if not item["loc"] else f"{key}: {message}"
    return f"{key}: got {item['input']!r}; expected: {message}"
