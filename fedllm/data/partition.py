"""Split records across simulated hospitals, and into train/eval sets, reproducibly.

Simulations need controllable heterogeneity: Dirichlet partitioning by specialty is the
standard way to dial clients from IID (large alpha) to highly skewed (small alpha). The
train/eval split works per patient, keyed by a hospital secret, so held-out metrics never
reward memorising a patient the model was trained on and one patient never moves another.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from fedllm.data.records import ClinicalRecord, DataError


def _check_partition_request(num_records: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise DataError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_records < num_partitions:
        raise DataError(
            f"cannot fill {num_partitions} partitions from {num_records} records; "
            "expected at least one record per partition"
        )


def _collect(
    records: Sequence[ClinicalRecord], assignment: Sequence[list[int]]
) -> list[list[ClinicalRecord]]:
    """Materialise index lists, keeping input order so results are easy to reason about."""
    return [[records[i] for i in sorted(indices)] for indices in assignment]


def _fill_empty(assignment: list[list[int]]) -> None:
    """Give every empty partition one record from the currently largest partition.

    Small alpha can leave a client with nothing, which a federated round cannot use; moving
    single records keeps the skew that the caller asked for as intact as possible.
    """
    for target in assignment:
        if not target:
            donor = max(assignment, key=len)
            target.append(donor.pop())


def dirichlet_partition(
    records: Sequence[ClinicalRecord], num_partitions: int, alpha: float, seed: int
) -> list[list[ClinicalRecord]]:
    """Split records non-IID by specialty, with Dirichlet(alpha) shares of each specialty.

    ``alpha = math.inf`` splits every specialty evenly (IID); very large alpha approaches it.
    Every partition is non-empty and every record lands in exactly one partition.
    """
    _check_partition_request(len(records), num_partitions)
    if not alpha > 0:
        raise DataError(f"alpha must be > 0 (use math.inf for IID), got {alpha}")
    rng = np.random.default_rng(seed)
    by_specialty: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_specialty[record.specialty].append(index)
    assignment: list[list[int]] = [[] for _ in range(num_partitions)]
    for specialty in sorted(by_specialty):
        indices = rng.permutation(by_specialty[specialty])
        if math.isinf(alpha):
            shares = np.full(num_partitions, 1.0 / num_partitions)
        else:
            shares = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for partition, chunk in zip(assignment, np.split(indices, cuts), strict=True):
            partition.extend(int(i) for i in chunk)
    _fill_empty(assignment)
    return _collect(records, assignment)


def column_partition(
    records: Sequence[ClinicalRecord], names: Sequence[str], column: str
) -> list[list[ClinicalRecord]]:
    """Each record to the hospital its own column names; every hospital must have records.

    A value that names no hospital is an error rather than dropped data: a typo in a site
    name would otherwise silently shrink that site.
    """
    by_hospital: dict[str, list[ClinicalRecord]] = {name: [] for name in names}
    unknown: dict[str, int] = defaultdict(int)
    for record in records:
        if record.hospital in by_hospital:
            by_hospital[record.hospital].append(record)
        else:
            unknown[str(record.hospital)] += 1
    if unknown:
        listed = ", ".join(
            f"{value!r} ({count} records)" for value, count in sorted(unknown.items())
        )
        raise DataError(
            f"{column} names hospitals not in federation.hospitals: {listed}; "
            f"expected one of {', '.join(names)}"
        )
    empty = [name for name, held in by_hospital.items() if not held]
    if empty:
        raise DataError(f"{column}: no records for hospital(s) {', '.join(empty)}")
    return [by_hospital[name] for name in names]


def iid_partition(
    records: Sequence[ClinicalRecord], num_partitions: int, seed: int
) -> list[list[ClinicalRecord]]:
    """Split records uniformly at random into partitions whose sizes differ by at most one."""
    _check_partition_request(len(records), num_partitions)
    order = np.random.default_rng(seed).permutation(len(records))
    return _collect(records, [chunk.tolist() for chunk in np.array_split(order, num_partitions)])


def patient_side_value(patient_id: str, key: bytes) -> float:
    """A uniform number in [0, 1) that only the patient's id and the hospital's key decide."""
    digest = hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_train_eval(
    records: Sequence[ClinicalRecord], eval_fraction: float, key: bytes
) -> tuple[list[ClinicalRecord], list[ClinicalRecord]]:
    """Hold out each patient with probability ``eval_fraction``, decided by HMAC(key, id).

    A patient's side depends on nothing but its own id and the hospital's secret key, so
    adding or removing one patient changes exactly one side by exactly that patient, and the
    split is the same for the dataset's whole life: neighbouring datasets give neighbouring
    training sets, which the DP guarantee needs. (Shuffling all patients with a seed would move
    hundreds of records when one patient is added.) The key is secret so that nobody outside
    the hospital can tell which side a patient is on. Both sides must be non-empty.
    """
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    if len(key) < 16:
        raise DataError("the split key must hold at least 128 bits")
    held_out = {
        patient
        for patient in {record.patient_id for record in records}
        if patient_side_value(patient, key) < eval_fraction
    }
    train = [record for record in records if record.patient_id not in held_out]
    evaluation = [record for record in records if record.patient_id in held_out]
    if not train or not evaluation:
        patients = len({record.patient_id for record in records})
        raise DataError(
            f"splitting {patients} patient(s) with eval_fraction {eval_fraction} left the "
            f"{'training' if not train else 'evaluation'} side empty; a hospital needs more "
            "patients (or a different data.eval_fraction)"
        )
    return train, evaluation
