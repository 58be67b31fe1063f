"""Which records each hospital holds, derived deterministically from the experiment config.

Simulated hospitals must see the same data in every process that asks (the hospital's own
ClientApp, the privacy planner, the centralised baseline), so everything here is a pure
function of the config, the hospital's index and its split key. A deployed hospital instead
reads its own records file (``LocalDataSource``, named by its node config), which never leaves
the site, and splits it with its own secret key.

A simulated hospital's split key: for synthetic data, derived from the seed that generated the
data (both are public to whoever has the config); for file or hub data, a secret kept in the
hospital's state directory next to its ledger (:mod:`fedllm.federation.hospital_state`).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from fedllm.config.schema import DataConfig, ExperimentConfig
from fedllm.data import (
    ClinicalRecord,
    column_partition,
    dirichlet_partition,
    generate_clinical_records,
    iid_partition,
    load_records,
    split_train_eval,
)
from fedllm.federation.hospital_state import (
    HospitalState,
    load_or_create_key,
    simulation_state,
    synthetic_split_key,
)


@dataclass(frozen=True)
class LocalDataSource:
    """A deployed hospital's own records: a JSONL or CSV file and its column names."""

    path: str
    format: Literal["jsonl", "csv"]
    text_field: str = "text"
    specialty_field: str | None = None
    patient_field: str | None = None


@dataclass(frozen=True)
class HospitalData:
    """A hospital's training records and its held-out (patient-disjoint) evaluation records."""

    name: str
    train: list[ClinicalRecord]
    eval: list[ClinicalRecord]


def shared_dataset_identity(config: ExperimentConfig) -> str | None:
    """Content identity of the records simulated hospitals share (None for synthetic data)."""
    if config.data.source == "synthetic":
        return None
    return _shared_records(config.data.model_dump_json())[1]


def check_simulation_ledgers(config: ExperimentConfig) -> None:
    """Before anything runs: the data loads, and its ledgers accept this run's partitioning.

    Raises DataError or LedgerLocationError (both ValueErrors) with the cause.
    """
    dataset_id = shared_dataset_identity(config)
    if dataset_id is not None:
        simulation_state(config, 0, "", dataset_id)


def simulation_split_key(
    config: ExperimentConfig, index: int, state: HospitalState | None = None
) -> bytes:
    """The split key of simulated hospital ``index`` (see the module docstring).

    ``state`` is the hospital's state directory when the caller has already resolved it.
    """
    dataset_id = shared_dataset_identity(config)
    if dataset_id is None:
        return synthetic_split_key(config, index)
    state = state or simulation_state(config, index, "", dataset_id)
    return load_or_create_key(state.directory / "split.key")


def hospital_data(
    config: ExperimentConfig,
    index: int,
    local: LocalDataSource | None = None,
    split_key: bytes | None = None,
) -> HospitalData:
    """Records of hospital ``index`` (0-based, in the order of ``federation.profiles()``).

    With ``local``, the records are the hospital's own file rather than the experiment's data
    section, and ``split_key`` (the hospital's secret) is required; without it a simulated
    hospital's key is found by :func:`simulation_split_key`.
    """
    profiles = config.federation.profiles()
    if not 0 <= index < len(profiles):
        raise ValueError(f"hospital index {index} outside 0..{len(profiles) - 1}")
    profile = profiles[index]
    seed = config.run.seed * 1000 + index
    if local is not None and split_key is None:
        raise ValueError("a hospital's own records need its own split key")
    key = split_key if split_key is not None else simulation_split_key(config, index)
    if local is not None:
        records = load_records(
            local.format,
            local.path,
            text_field=local.text_field,
            specialty_field=local.specialty_field,
            patient_field=local.patient_field,
        )
    elif config.data.source == "synthetic":
        records = generate_clinical_records(
            profile.data_size, profile.specialty_mix, seed=seed, hospital_tag=f"h{index}"
        )
    else:
        names = tuple(p.name for p in profiles)
        records = _file_partitions(config.data.model_dump_json(), names, config.run.seed)[index]
    train, held_out = split_train_eval(records, config.data.eval_fraction, key)
    return HospitalData(profile.name, train, held_out)


def training_texts(records: Sequence[ClinicalRecord], unit: str) -> list[str]:
    """One text per DP sampling unit: per record, or all of a patient's records joined.

    With the patient as the unit, a patient is one example that is sampled, clipped and
    noised as a whole, so the guarantee covers everything recorded about that patient.
    """
    if unit == "record":
        return [record.text for record in records]
    by_patient: dict[str, list[str]] = defaultdict(list)
    for record in records:
        by_patient[record.patient_id].append(record.text)
    return ["\n".join(texts) for texts in by_patient.values()]


@lru_cache(maxsize=4)
def _shared_records(data_json: str) -> tuple[list[ClinicalRecord], str]:
    """Load the shared file once per process, with the content identity of what was loaded.

    The identity hashes the records as fedllm sees them (text, specialty, patient), so it is
    the same whatever path or copy the file is read from, and changes when any record does.
    """
    data = DataConfig.model_validate_json(data_json)
    records = load_records(
        data.source,
        data.path or "",
        text_field=data.text_field,
        specialty_field=data.specialty_field,
        patient_field=data.patient_field,
        split=data.split,
        hospital_field=data.hospital_field,
    )
    digest = hashlib.sha256()
    for record in records:
        fields = [record.text, record.specialty, record.patient_id]
        if record.hospital is not None:
            fields.append(record.hospital)
        digest.update(json.dumps(fields).encode())
        digest.update(b"\n")
    return records, digest.hexdigest()[:32]


@lru_cache(maxsize=4)
def _file_partitions(
    data_json: str, names: tuple[str, ...], seed: int
) -> tuple[list[ClinicalRecord], ...]:
    """Split the shared records between hospitals `names` (the same way in every process)."""
    data = DataConfig.model_validate_json(data_json)
    records = _shared_records(data_json)[0]
    if data.partition == "column":
        return tuple(
            column_partition(records, names, f"data.hospital_field {data.hospital_field!r}")
        )
    if data.partition == "iid":
        return tuple(iid_partition(records, len(names), seed))
    return tuple(dirichlet_partition(records, len(names), data.dirichlet_alpha, seed))
