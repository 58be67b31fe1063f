"""Tests for fedllm.data: generators, loaders and partitioners."""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import datasets
import pytest

from fedllm.data import (
    SPECIALTIES,
    ClinicalRecord,
    DataError,
    column_partition,
    dirichlet_partition,
    generate_clinical_records,
    generate_public_medical_text,
    iid_partition,
    load_records,
    split_train_eval,
    vocabulary_corpus,
)
from fedllm.data.partition import patient_side_value

_WORD = re.compile(r"[A-Za-z]+|\d+(?:\.\d+)?")


def _words(texts: Sequence[str]) -> Counter[str]:
    return Counter(word for text in texts for word in _WORD.findall(text))


def _total_variation(left: Counter[str], right: Counter[str]) -> float:
    left_total, right_total = sum(left.values()), sum(right.values())
    keys = set(left) | set(right)
    return 0.5 * sum(abs(left[k] / left_total - right[k] / right_total) for k in keys)


def _write_jsonl(path: Path, rows: Sequence[object]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


_ROWS = [
    {"note": "Chest pain on exertion.", "dept": "cardiology", "pid": "a1"},
    {"note": "   ", "dept": "oncology", "pid": "a2"},
    {"note": "Wheezing at night.", "dept": "", "pid": None},
    {"note": "Ear pain and fever.", "dept": "pediatrics", "pid": "a1"},
]


# --- synthetic generators -------------------------------------------------------------------


def test_clinical_records_are_deterministic_and_depend_on_seed_and_tag() -> None:
    first = generate_clinical_records(50, None, seed=3, hospital_tag="h1")
    assert first == generate_clinical_records(50, None, seed=3, hospital_tag="h1")
    assert first != generate_clinical_records(50, None, seed=4, hospital_tag="h1")
    other_tag = generate_clinical_records(50, None, seed=3, hospital_tag="h2")
    assert [r.text for r in first] != [r.text for r in other_tag]


def test_clinical_records_shape() -> None:
    records = generate_clinical_records(1200, None, seed=0, hospital_tag="hA_")
    assert len(records) == 1200
    assert {r.specialty for r in records} == set(SPECIALTIES)
    assert all(re.fullmatch(r"hA_p\d{5}", r.patient_id) for r in records)
    lengths = [len(r.text.split()) for r in records]
    assert min(lengths) >= 20
    assert max(lengths) <= 60
    qa_share = sum(r.text.startswith("Question: ") for r in records) / len(records)
    assert 0.32 < qa_share < 0.48
    qa = next(r.text for r in records if r.text.startswith("Question: "))
    assert "\nAnswer: " in qa
    per_patient = len(records) / len({r.patient_id for r in records})
    assert 2.5 < per_patient < 3.5


def test_patient_keeps_one_specialty() -> None:
    records = generate_clinical_records(300, None, seed=1)
    specialties: dict[str, set[str]] = {}
    for record in records:
        specialties.setdefault(record.patient_id, set()).add(record.specialty)
    assert all(len(s) == 1 for s in specialties.values())


def test_zero_records_is_empty() -> None:
    assert generate_clinical_records(0, None, seed=0) == []


def test_specialty_mix_skews_distribution() -> None:
    mix = {"cardiology": 0.9, "neurology": 0.1}
    records = generate_clinical_records(1000, mix, seed=5)
    counts = Counter(r.specialty for r in records)
    assert counts["cardiology"] / len(records) > 0.8
    assert set(counts) == {"cardiology", "neurology"}


def test_unknown_specialty_raises_listing_valid_ones() -> None:
    with pytest.raises(DataError, match="dermatology") as info:
        generate_clinical_records(10, {"dermatology": 1.0}, seed=0)
    assert all(name in str(info.value) for name in SPECIALTIES)


@pytest.mark.parametrize("mix", [{"cardiology": 0.0}, {"cardiology": -1.0, "oncology": 2.0}])
def test_invalid_specialty_weights_raise(mix: dict[str, float]) -> None:
    with pytest.raises(DataError, match="specialty_mix"):
        generate_clinical_records(10, mix, seed=0)


def test_different_mixes_give_different_word_distributions() -> None:
    cardio = {"cardiology": 0.8, "emergency": 0.2}
    neuro = {"neurology": 0.8, "pediatrics": 0.2}
    hospital_a = _words([r.text for r in generate_clinical_records(400, cardio, seed=1)])
    hospital_a2 = _words([r.text for r in generate_clinical_records(400, cardio, seed=2)])
    hospital_b = _words([r.text for r in generate_clinical_records(400, neuro, seed=1)])
    same_mix = _total_variation(hospital_a, hospital_a2)
    different_mix = _total_variation(hospital_a, hospital_b)
    assert different_mix > 3 * same_mix
    assert different_mix > 0.2


def test_public_text_is_deterministic_and_not_the_private_templates() -> None:
    texts = generate_public_medical_text(300, seed=0)
    assert texts == generate_public_medical_text(300, seed=0)
    assert texts != generate_public_medical_text(300, seed=1)
    assert not any("Question:" in t or "Chief complaint:" in t or "Plan:" in t for t in texts)
    private = [r.text for r in generate_clinical_records(1000, None, seed=0)]
    assert not set(texts) & set(private)
    public_vocab = set(_words(texts))
    shared = public_vocab & set(_words(private))
    assert len(shared) / len(public_vocab) > 0.6


def test_vocabulary_corpus_covers_every_generated_word() -> None:
    corpus = vocabulary_corpus()
    assert corpus == vocabulary_corpus()
    assert len(corpus) < 5000
    covered = set(_words(corpus))
    for seed in (11, 12, 13):
        private = [r.text for r in generate_clinical_records(1500, None, seed=seed)]
        public = generate_public_medical_text(1500, seed=seed)
        missing = set(_words(private + public)) - covered
        assert not missing
    alphabetic = {w for w in covered if w.isalpha()}
    assert 150 < len(alphabetic) < 1000


# --- loaders --------------------------------------------------------------------------------


def test_load_jsonl_with_labels_defaults_and_blank_rows(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "notes.jsonl", _ROWS)
    records = load_records(
        "jsonl", path, text_field="note", specialty_field="dept", patient_field="pid"
    )
    assert records == [
        ClinicalRecord("Chest pain on exertion.", "cardiology", "a1"),
        ClinicalRecord("Wheezing at night.", "unknown", "row2"),
        ClinicalRecord("Ear pain and fever.", "pediatrics", "a1"),
    ]


def test_load_jsonl_without_label_fields_makes_one_patient_per_row(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "notes.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    records = load_records("jsonl", path, limit=2)
    assert records == [
        ClinicalRecord("a", "unknown", "row0"),
        ClinicalRecord("b", "unknown", "row1"),
    ]


def test_load_csv(tmp_path: Path) -> None:
    rows = [[r["note"], r["dept"], r["pid"] or ""] for r in _ROWS]
    path = _write_csv(tmp_path / "notes.csv", ["note", "dept", "pid"], rows)
    records = load_records(
        "csv", path, text_field="note", specialty_field="dept", patient_field="pid"
    )
    assert [(r.specialty, r.patient_id) for r in records] == [
        ("cardiology", "a1"),
        ("unknown", "row2"),
        ("pediatrics", "a1"),
    ]
    assert records[0].text == "Chest pain on exertion."


def test_load_huggingface_save_to_disk(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_list([{"text": "Note one.", "specialty": "oncology"}] * 3)
    dataset.save_to_disk(str(tmp_path / "single"))
    records = load_records("huggingface", str(tmp_path / "single"), specialty_field="specialty")
    assert records == [ClinicalRecord("Note one.", "oncology", f"row{i}") for i in range(3)]

    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"text": "train note"}]),
        test=datasets.Dataset.from_list([{"text": "test note"}]),
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    test = load_records("huggingface", str(tmp_path / "splits"), split="test")
    assert [r.text for r in test] == ["test note"]
    with pytest.raises(DataError, match=r"'validation'.*train, test"):
        load_records("huggingface", str(tmp_path / "splits"), split="validation")


def test_load_huggingface_via_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "raw"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"text": "x y z", "pid": 7}])
    records = load_records("huggingface", str(folder), patient_field="pid")
    assert records == [ClinicalRecord("x y z", "unknown", "7")]


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.jsonl")
    for source in ("jsonl", "csv"):
        with pytest.raises(DataError, match=r"absent\.jsonl"):
            load_records(source, missing)


def test_bad_json_line_reports_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: invalid JSON"):
        load_records("jsonl", str(path))


def test_non_object_json_line_is_rejected(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "list.jsonl", [["text"]])
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        load_records("jsonl", path)


def test_missing_text_column_lists_existing_columns(tmp_path: Path) -> None:
    jsonl = _write_jsonl(tmp_path / "n.jsonl", [{"body": "x", "ward": "a"}])
    with pytest.raises(DataError, match=r"n\.jsonl.*'text'.*\['body', 'ward'\]"):
        load_records("jsonl", jsonl)
    table = _write_csv(tmp_path / "n.csv", ["body", "ward"], [])
    with pytest.raises(DataError, match=r"n\.csv.*'text'.*\['body', 'ward'\]"):
        load_records("csv", table)
    datasets.Dataset.from_list([{"body": "x"}]).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"'text'.*\['body'\]"):
        load_records("huggingface", str(tmp_path / "hf"))


def test_missing_label_column_is_named(tmp_path: Path) -> None:
    table = _write_csv(tmp_path / "n.csv", ["text"], [["a note"]])
    with pytest.raises(DataError, match="'specialty'"):
        load_records("csv", table, specialty_field="specialty")


def test_only_blank_text_is_an_empty_data_set(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "blank.jsonl", [{"text": " "}, {"text": None}])
    with pytest.raises(DataError, match=r"blank\.jsonl: no records.*'text'"):
        load_records("jsonl", path)


def test_empty_csv_and_non_text_values_are_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.csv.*header"):
        load_records("csv", str(empty))
    numbers = _write_jsonl(tmp_path / "num.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match="'text' must be text"):
        load_records("jsonl", numbers)


def test_non_utf8_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8"):
        load_records("csv", str(path))


def test_unknown_source_and_bad_limit(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'parquet'.*csv, huggingface, jsonl"):
        load_records("parquet", str(tmp_path))
    with pytest.raises(DataError, match="limit"):
        load_records("jsonl", str(tmp_path), limit=0)


def test_unreachable_huggingface_dataset_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no_such_dir"):
        load_records("huggingface", str(tmp_path / "no_such_dir"))


# --- partitioning ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records() -> list[ClinicalRecord]:
    return generate_clinical_records(600, None, seed=42)


def _label_skew(partitions: list[list[ClinicalRecord]]) -> float:
    """Mean total-variation distance between each partition's and the global label mix."""
    overall = Counter(r.specialty for part in partitions for r in part)
    return sum(
        _total_variation(Counter(r.specialty for r in part), overall) for part in partitions
    ) / len(partitions)


def _assert_exact_cover(
    partitions: list[list[ClinicalRecord]], records: Sequence[ClinicalRecord]
) -> None:
    assert all(partitions)
    assert Counter(r for part in partitions for r in part) == Counter(records)


@pytest.mark.parametrize("alpha", [0.01, 0.3, 5.0, math.inf])
def test_dirichlet_partition_covers_every_record_once(
    records: list[ClinicalRecord], alpha: float
) -> None:
    partitions = dirichlet_partition(records, 8, alpha, seed=0)
    assert len(partitions) == 8
    _assert_exact_cover(partitions, records)
    assert partitions == dirichlet_partition(records, 8, alpha, seed=0)


def test_dirichlet_small_alpha_is_more_skewed(records: list[ClinicalRecord]) -> None:
    skewed = _label_skew(dirichlet_partition(records, 5, 0.1, seed=1))
    near_iid = _label_skew(dirichlet_partition(records, 5, 1000.0, seed=1))
    assert skewed > 0.3
    assert near_iid < 0.1
    assert dirichlet_partition(records, 5, 0.1, seed=1) != dirichlet_partition(
        records, 5, 0.1, seed=2
    )


def test_dirichlet_fills_partitions_even_when_scarce() -> None:
    few = generate_clinical_records(6, {"oncology": 1.0}, seed=0)
    partitions = dirichlet_partition(few, 6, 0.01, seed=3)
    _assert_exact_cover(partitions, few)
    assert [len(p) for p in partitions] == [1] * 6


def test_partition_arguments_are_validated(records: list[ClinicalRecord]) -> None:
    with pytest.raises(DataError, match="alpha"):
        dirichlet_partition(records, 3, 0.0, seed=0)
    with pytest.raises(DataError, match="at least one record per partition"):
        iid_partition(records[:2], 3, seed=0)
    with pytest.raises(DataError, match="num_partitions"):
        dirichlet_partition(records, 0, 1.0, seed=0)


def test_iid_partition_is_balanced_and_deterministic(records: list[ClinicalRecord]) -> None:
    partitions = iid_partition(records, 7, seed=0)
    _assert_exact_cover(partitions, records)
    assert {len(p) for p in partitions} <= {85, 86}
    assert partitions == iid_partition(records, 7, seed=0)
    assert partitions != iid_partition(records, 7, seed=1)
    assert _label_skew(partitions) < 0.15


# --- train/eval split -----------------------------------------------------------------------


KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@pytest.mark.parametrize("eval_fraction", [0.05, 0.2, 0.5, 0.95])
def test_split_train_eval_never_shares_a_patient(
    records: list[ClinicalRecord], eval_fraction: float
) -> None:
    train, evaluation = split_train_eval(records, eval_fraction, KEY)
    assert train
    assert evaluation
    assert not {r.patient_id for r in train} & {r.patient_id for r in evaluation}
    assert Counter(train + evaluation) == Counter(records)
    assert (train, evaluation) == split_train_eval(records, eval_fraction, KEY)


def test_split_train_eval_fraction_and_key(records: list[ClinicalRecord]) -> None:
    _, evaluation = split_train_eval(records, 0.2, KEY)
    patients = {r.patient_id for r in records}
    held_out = {r.patient_id for r in evaluation}
    assert 0.12 < len(held_out) / len(patients) < 0.28
    assert evaluation != split_train_eval(records, 0.2, OTHER_KEY)[1]


def test_adding_or_removing_a_patient_moves_no_other_patient(
    records: list[ClinicalRecord],
) -> None:
    """Neighbouring datasets must give neighbouring training sets: one patient, one side."""
    train, evaluation = split_train_eval(records, 0.2, KEY)
    newcomer = [ClinicalRecord(f"note {i}", "oncology", "p-new") for i in range(3)]
    train_plus, eval_plus = split_train_eval([*records, *newcomer], 0.2, KEY)
    if train_plus == train:
        assert eval_plus == [*evaluation, *newcomer]
    else:
        assert (train_plus, eval_plus) == ([*train, *newcomer], evaluation)
    leaving = records[0].patient_id
    train_minus, eval_minus = split_train_eval(
        [r for r in records if r.patient_id != leaving], 0.2, KEY
    )
    assert train_minus == [r for r in train if r.patient_id != leaving]
    assert eval_minus == [r for r in evaluation if r.patient_id != leaving]


def test_a_patients_side_depends_only_on_its_id_and_the_key() -> None:
    alone = [ClinicalRecord("a", "x", "p1"), ClinicalRecord("b", "x", "p2")]
    many = [*alone, *(ClinicalRecord(str(i), "x", f"q{i}") for i in range(200))]
    side = {value: patient_side_value(value, KEY) < 0.3 for value in ("p1", "p2")}
    for collection in (alone, many):
        try:
            _, evaluation = split_train_eval(collection, 0.3, KEY)
        except DataError:
            continue
        held = {r.patient_id for r in evaluation}
        assert {p: p in held for p in side} == side


def test_split_train_eval_rejects_bad_input(records: list[ClinicalRecord]) -> None:
    single = [ClinicalRecord("a", "x", "p1"), ClinicalRecord("b", "x", "p1")]
    with pytest.raises(DataError, match="empty"):
        split_train_eval(single, 0.5, KEY)
    with pytest.raises(DataError, match="eval_fraction"):
        split_train_eval(records, 1.0, KEY)
    with pytest.raises(DataError, match="128 bits"):
        split_train_eval(records, 0.2, b"short")


def _multi_site_export(path: Path) -> str:
    """A two-site export: each row names its own site in a ``site`` column.

    South holds 100 patients, so its secret HMAC split leaves no side empty (0.8^100).
    """
    rows = [
        {"note": f"note {i}", "pid": f"p{i}", "site": "north" if i % 3 else "south"}
        for i in range(300)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_partition_by_column_keeps_each_site_together(tmp_path: Path) -> None:
    from fedllm.config import validate_config
    from fedllm.federation.hospital_data import hospital_data

    path = _multi_site_export(tmp_path / "sites.jsonl")
    records = load_records("jsonl", path, text_field="note", hospital_field="site")
    north, south = column_partition(records, ["north", "south"], "site")
    assert {r.hospital for r in north} == {"north"}
    assert {r.hospital for r in south} == {"south"}
    assert len(north) + len(south) == 300
    assert len(south) == 100
    config = validate_config(
        {
            "federation": {
                "num_hospitals": 2,
                "cohort_size": 2,
                "hospitals": [{"name": "south"}, {"name": "north"}],
            },
            "data": {
                "source": "jsonl",
                "path": path,
                "text_field": "note",
                "patient_field": "pid",
                "partition": "column",
                "hospital_field": "site",
            },
            "privacy": {"ledger_dir": str(tmp_path / "ledgers")},
        }
    )
    held = hospital_data(config, 0)  # profile 0 is "south", whatever the file's order
    assert {r.hospital for r in [*held.train, *held.eval]} == {"south"}
    assert len(held.train) + len(held.eval) == 100


def test_partition_by_column_refuses_unknown_and_missing_sites(tmp_path: Path) -> None:
    path = _multi_site_export(tmp_path / "sites.jsonl")
    records = load_records("jsonl", path, text_field="note", hospital_field="site")
    with pytest.raises(DataError, match=r"'south' \(100 records\)"):
        column_partition(records, ["north", "east"], "data.hospital_field 'site'")
    with pytest.raises(DataError, match="no records for hospital"):
        column_partition(records, ["north", "south", "west"], "site")
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"note": "x", "site": " "}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="'site' is empty"):
        load_records("jsonl", str(blank), text_field="note", hospital_field="site")
