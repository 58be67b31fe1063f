"""Load a hospital's own data (JSONL, CSV or a Hugging Face dataset) into ``ClinicalRecord``s.

Hospitals export notes in whatever shape their systems produce, so column names are
configurable and missing labels get safe defaults. Every problem becomes a ``DataError`` that
names the file and field, because the person reading it is usually a data steward, not a
Python developer.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedllm.data.records import ClinicalRecord, DataError

_SOURCES = ("csv", "huggingface", "jsonl")
_UNKNOWN_SPECIALTY = "unknown"


def _existing_file(path: str) -> Path:
    """Resolve a local data file, failing with a message that names it."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file not found: {path} (expected an existing file)")
    return file


def _jsonl_rows(path: str) -> Iterator[dict[str, Any]]:
    """One JSON object per non-blank line; keys may vary, so columns are checked per row."""
    file = _existing_file(path)
    with file.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}, line {line_number}: invalid JSON ({error.msg})"
                ) from error
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}"
                )
            yield row


def _csv_rows(path: str, required: Iterable[str]) -> Iterator[dict[str, Any]]:
    """CSV rows; the header is checked up front so a wrong column name fails even without rows."""
    file = _existing_file(path)
    with file.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise DataError(f"{path}: CSV file is empty (expected a header row)")
        _require_columns(path, reader.fieldnames, required)
        try:
            yield from reader
        except csv.Error as error:
            raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({error})") from error


def _huggingface_rows(
    path: str, split: str, required: Iterable[str]
) -> Iterable[Mapping[str, Any]]:
    """Rows of a ``save_to_disk`` directory or of anything ``datasets.load_dataset`` accepts.

    ``datasets`` is imported here because it is slow to import and only this source needs it.
    Offline behaviour (``HF_DATASETS_OFFLINE``, ``HF_HUB_OFFLINE``) is left to ``datasets``.
    """
    import datasets

    directory = Path(path)
    saved = (directory / "dataset_info.json").is_file() or (
        directory / "dataset_dict.json"
    ).is_file()
    try:
        if saved:
            dataset = datasets.load_from_disk(path)
        else:
            dataset = datasets.load_dataset(path, split=split)
    except (FileNotFoundError, ConnectionError) as error:
        reason = str(error).rstrip(".")
        raise DataError(
            f"could not load Hugging Face dataset {path!r} (split {split!r}): {reason}. Expected "
            "a directory written by save_to_disk, or a dataset id that is cached or reachable."
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(
                f"{path}: no split {split!r}; available splits are {', '.join(dataset)}"
            )
        dataset = dataset[split]
    _require_columns(path, dataset.column_names, required)
    return dataset


def _require_columns(origin: str, columns: Iterable[str], required: Iterable[str]) -> None:
    """Fail on a missing column, listing the real ones so a typo in the config is obvious."""
    available = list(columns)
    for name in required:
        if name not in available:
            raise DataError(f"{origin}: missing column {name!r}; available columns are {available}")


def _label(value: Any, default: str) -> str:
    """A specialty or patient label; blank cells mean "not recorded", not a real label."""
    if value is None or not str(value).strip():
        return default
    return str(value).strip()


def _to_records(
    rows: Iterable[Mapping[str, Any]],
    origin: str,
    text_field: str,
    specialty_field: str | None,
    patient_field: str | None,
    limit: int | None,
    required: Sequence[str],
    hospital_field: str | None = None,
) -> list[ClinicalRecord]:
    """Normalise rows into records; ``index`` counts rows from 0 and seeds default patient ids."""
    records: list[ClinicalRecord] = []
    for index, row in enumerate(rows):
        if limit is not None and len(records) >= limit:
            break
        _require_columns(f"{origin}, row {index} (counting from 0)", row, required)
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(
                f"{origin}, row {index}: field {text_field!r} must be text, "
                f"got {type(text).__name__}"
            )
        if not text.strip():
            continue
        specialty = row[specialty_field] if specialty_field else None
        patient = row[patient_field] if patient_field else None
        hospital = None
        if hospital_field:
            hospital = _label(row[hospital_field], "")
            if not hospital:
                raise DataError(
                    f"{origin}, row {index}: field {hospital_field!r} is empty; every record "
                    "needs the hospital it belongs to"
                )
        records.append(
            ClinicalRecord(
                text=text,
                specialty=_label(specialty, _UNKNOWN_SPECIALTY),
                patient_id=_label(patient, f"row{index}"),
                hospital=hospital,
            )
        )
    if not records:
        raise DataError(f"{origin}: no records with non-empty text in field {text_field!r}")
    return records


def load_records(
    source: str,
    path: str,
    *,
    text_field: str = "text",
    specialty_field: str | None = None,
    patient_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    hospital_field: str | None = None,
) -> list[ClinicalRecord]:
    """Load records from ``source`` ("jsonl", "csv" or "huggingface") at ``path``.

    Rows with blank text are skipped rather than rejected, since exports often contain
    empty notes. Without ``patient_field`` each row becomes its own patient (``row{index}``,
    stable across runs), which is the conservative choice for patient-level privacy.
    ``limit`` caps the number of records kept, for quick experiments on large exports.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of records, got {limit}")
    fields = (specialty_field, patient_field, hospital_field)
    columns = [text_field, *(name for name in fields if name)]
    rows: Iterable[Mapping[str, Any]]
    if source == "jsonl":
        rows = _jsonl_rows(path)
    elif source == "csv":
        rows = _csv_rows(path, columns)
    elif source == "huggingface":
        rows = _huggingface_rows(path, split, columns)
    else:
        raise DataError(f"unknown data source {source!r}; expected one of: {', '.join(_SOURCES)}")
    try:
        return _to_records(
            rows, path, text_field, specialty_field, patient_field, limit, columns, hospital_field
        )
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error}); re-export it as UTF-8") from error
