"""What a SuperNode's node config tells the ClientApp about the hospital it runs at.

A simulated hospital is identified by Flower's ``partition-id`` and its records and ledger
follow from the experiment config and the run directory. A deployed hospital's operator sets
the node config instead (``fedllm hospital start`` writes it from ``hospital.yaml``): which
hospital of the experiment this node is, its own records file, where its privacy ledger lives,
its own ε cap, the file holding its secret train/eval split key, whether it lets the server
evaluate on its held-out patients at all, and the directory its inference server hot-reloads
the federation's published adapter from (``adapter-dir``, where a run delivers it). The keys
are defined here once, for both the writer and the reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: importing the ClientApp loads no PyTorch
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
SPLIT_KEY_FILE = "split-key-file"
EVALUATION = "evaluation"
ADAPTER_DIR = "adapter-dir"
EVALUATION_VALUES = ("dp", "off")


class NodeConfigError(ValueError):
    """The node config does not fit the experiment (unknown hospital, bad data format)."""


@dataclass(frozen=True)
class NodeSettings:
    """The hospital a ClientApp serves, resolved against the run's experiment config."""

    index: int
    ledger_url: str
    epsilon_cap: float | None
    local_data: LocalDataSource | None
    split_key: bytes
    ledger_scope: str
    evaluation_allowed: bool = True


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
    from fedllm.federation.hospital_data import LocalDataSource

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


def _deployed_split_key(node: Mapping[str, object], ledger_url: str | None) -> bytes:
    """A deployed hospital's split key: its ``split-key-file``, else beside a SQLite ledger."""
    from fedllm.federation.hospital_state import load_or_create_key

    if SPLIT_KEY_FILE in node:
        return load_or_create_key(Path(str(node[SPLIT_KEY_FILE])).expanduser())
    if ledger_url and ledger_url.startswith("sqlite:///"):
        return load_or_create_key(Path(ledger_url.removeprefix("sqlite:///")).parent / "split.key")
    raise NodeConfigError(
        f"{SPLIT_KEY_FILE}: a hospital with its own records needs a secret split-key file "
        "(fedllm hospital start writes one beside the ledger)"
    )


def node_settings(
    config: ExperimentConfig, node: Mapping[str, object], run_dir: str
) -> NodeSettings:
    """Resolve a node config.

    A simulated hospital's ledger and split key live in its state directory: under the run
    directory for synthetic data, under ``privacy.ledger_dir`` per dataset otherwise.
    """
    from fedllm.federation.hospital_data import shared_dataset_identity, simulation_split_key
    from fedllm.federation.hospital_state import simulation_state

    index = hospital_index(config, node)
    local = local_data_source(node)
    given_ledger = str(node[LEDGER_URL]) if LEDGER_URL in node else None
    if local is None:
        state = simulation_state(config, index, run_dir, shared_dataset_identity(config))
        state.directory.mkdir(parents=True, exist_ok=True)
        ledger_url = given_ledger or state.ledger_url
        split_key = simulation_split_key(config, index, state)
        scope = state.scope
    else:
        if given_ledger is None:
            raise NodeConfigError(f"{LEDGER_URL}: a hospital with its own records needs a ledger")
        ledger_url, scope = given_ledger, "dataset"
        split_key = _deployed_split_key(node, given_ledger)
    evaluation = str(node.get(EVALUATION, "dp"))
    if evaluation not in EVALUATION_VALUES:
        raise NodeConfigError(f"{EVALUATION}: got {evaluation!r}; expected 'dp' or 'off'")
    cap = node.get(EPSILON_CAP)
    return NodeSettings(
        index=index,
        ledger_url=ledger_url,
        epsilon_cap=float(str(cap)) if cap is not None else None,
        local_data=local,
        split_key=split_key,
        ledger_scope=scope,
        evaluation_allowed=evaluation == "dp",
    )


def adapter_dir(node: Mapping[str, object]) -> Path:
    """Where this hospital's inference server hot-reloads the published adapter from."""
    if ADAPTER_DIR not in node:
        raise NodeConfigError(
            f"{ADAPTER_DIR}: this node has no adapter directory to deliver the adapter to "
            "(set inference.adapter_dir in hospital.yaml)"
        )
    return Path(str(node[ADAPTER_DIR])).expanduser()
