"""Clinical text data: the record type, synthetic generators, loaders and partitioners.

Other packages import from here rather than from the submodules, so the layout inside
``fedllm.data`` can change without touching them.
"""

from fedllm.data.loaders import load_records
from fedllm.data.partition import (
    column_partition,
    dirichlet_partition,
    iid_partition,
    split_train_eval,
)
from fedllm.data.records import ClinicalRecord, DataError
from fedllm.data.synthetic import (
    SPECIALTIES,
    generate_clinical_records,
    generate_public_medical_text,
    vocabulary_corpus,
)

__all__ = [
    "SPECIALTIES",
    "ClinicalRecord",
    "DataError",
    "column_partition",
    "dirichlet_partition",
    "generate_clinical_records",
    "generate_public_medical_text",
    "iid_partition",
    "load_records",
    "split_train_eval",
    "vocabulary_corpus",
]
