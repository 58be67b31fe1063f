"""What a SuperNode's node config tells the ClientApp about the hospital it runs at.

A simulated hospital is identified by Flower's ``partition-id`` and its records and ledger
follow from the experiment config and the run directory. A deployed hospital's operator sets
the node config instead (``fedllm hospital start`` writes it from ``hospital.yaml``): which
hospital of the experiment this node is, its own records file, where its privacy ledger lives
and its own ε cap. The keys are defined here once, for both the writer and the reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedllm.config.schema import ExperimentConfig
from fedllm.federation.hospital_data import LocalDataSource

HOSPITAL_INDEX = "hospital-index"
HOSPITAL_NAME = "hospital-name"
LEDGER_URL = "ledger-url"
EPSILON_CAP = "epsilon-cap"
DATA_PATH = "data-path"
DATA_FORMAT = "data-format"
DATA_TEXT_FIELD = "data-text-field"
DATA_SPECIALTY_FIELD = "data-specialty-field"
DATA_PATIENT_FIELD = "data-patient-field"


class NodeConfigError(ValueError):
    """The node config does not fit the experiment (unknown hospital, bad data format)."""


@dataclass(frozen=True)
class NodeSettings:
    """The hospital a ClientApp serves, resolved against the run's experiment config."""

    index: int
    ledger_url: str
    epsilon_cap: float | None
    local_data: LocalDataSource | None


def hospital_index(config: ExperimentConfig, node: Mapping[str, object]) -> int:
    """``hospital-name`` (matched against the experiment's hospitals), else ``hospital-index``,
    else Flower's simulation ``partition-id``."""
    profiles = config.federation.profiles()
    if HOSPITAL_NAME in node:
        names = [profile.name for profile in profiles]
        name = str(node[HOSPITAL_NAME])
        if name not in names:
            raise NodeConfigError(
                f"this node is hospital {name!r}, but the experiment's federation.hospitals "
                f"lists {names}; ask the researcher to add it"
            )
        return names.index(name)
    return int(str(node.get(HOSPITAL_INDEX, node.get("partition-id", 0))))


def local_data_source(node: Mapping[str, object]) -> LocalDataSource | None:
    """The hospital's own records file, when the node config names one."""
    if DATA_PATH not in node:
        return None
    path = str(node[DATA_PATH])
    data_format = str(node.get(DATA_FORMAT, Path(path).suffix.lstrip(".").lower()))
    if data_format not in ("jsonl", "csv"):
        raise NodeConfigError(
            f"{DATA_FORMAT}: got {data_format!r} for {path}; expected 'jsonl' or 'csv'"
        )
    specialty = node.get(DATA_SPECIALTY_FIELD)
    patient = node.get(DATA_PATIENT_FIELD)
    return LocalDataSource(
        path=path,
        format="jsonl" if data_format == "jsonl" else "csv",
        text_field=str(node.get(DATA_TEXT_FIELD, "text")),
        specialty_field=str(specialty) if specialty else None,
        patient_field=str(patient) if patient else None,
    )


def node_settings(
    config: ExperimentConfig, node: Mapping[str, object], run_dir: str
) -> NodeSettings:
    """Resolve a node config; simulation defaults keep the ledger under the run directory."""
    index = hospital_index(config, node)
    name = config.federation.profiles()[index].name
    if LEDGER_URL in node:
        ledger_url = str(node[LEDGER_URL])
    else:
        default_ledger = Path(run_dir) / "hospitals" / name / "ledger.db"
        default_ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger_url = f"sqlite:///{default_ledger}"
    cap = node.get(EPSILON_CAP)
    return NodeSettings(
        index=index,
        ledger_url=ledger_url,
        epsilon_cap=float(str(cap)) if cap is not None else None,
        local_data=local_data_source(node),
    )
