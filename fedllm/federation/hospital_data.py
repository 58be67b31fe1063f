"""Which records each hospital holds, derived deterministically from the experiment config.

Simulated hospitals must see the same data in every process that asks (the hospital's own
ClientApp, the privacy planner, the centralised baseline), so everything here is a pure
function of the config and the hospital's index. A deployed hospital instead reads its own
records file (``LocalDataSource``, named by its node config), which never leaves the site.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from fedllm.config.schema import DataConfig, ExperimentConfig
from fedllm.data import (
    ClinicalRecord,
    dirichlet_partition,
    generate_clinical_records,
    iid_partition,
    load_records,
    split_train_eval,
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


def hospital_data(
    config: ExperimentConfig, index: int, local: LocalDataSource | None = None
) -> HospitalData:
    """Records of hospital ``index`` (0-based, in the order of ``federation.profiles()``).

    With ``local``, the records are the hospital's own file rather than the experiment's data
    section; the patient-disjoint train/eval split is the same either way.
    """
    profiles = config.federation.profiles()
    if not 0 <= index < len(profiles):
        raise ValueError(f"hospital index {index} outside 0..{len(profiles) - 1}")
    profile = profiles[index]
    seed = config.run.seed * 1000 + index
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
        records = _file_partitions(config.data.model_dump_json(), len(profiles), config.run.seed)[
            index
        ]
    train, held_out = split_train_eval(records, config.data.eval_fraction, seed)
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
def _file_partitions(
    data_json: str, num_hospitals: int, seed: int
) -> tuple[list[ClinicalRecord], ...]:
    """Load the shared file once per process and split it between hospitals."""
    data = DataConfig.model_validate_json(data_json)
    records = load_records(
        data.source,
        data.path or "",
        text_field=data.text_field,
        specialty_field=data.specialty_field,
        patient_field=data.patient_field,
        split=data.split,
    )
    if data.partition == "iid":
        return tuple(iid_partition(records, num_hospitals, seed))
    return tuple(dirichlet_partition(records, num_hospitals, data.dirichlet_alpha, seed))
