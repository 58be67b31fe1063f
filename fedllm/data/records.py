"""The record type every data source is normalised into, and the error users see.

Keeping one small, immutable record type lets loaders, generators, partitioners and the
privacy layer agree on what a training example is without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClinicalRecord:
    """One training sequence together with the labels federated fine-tuning needs.

    ``specialty`` drives non-IID partitioning and per-specialty reporting; ``patient_id``
    lets the privacy layer bound the contribution of a whole patient rather than of a
    single note, and lets evaluation hold out entire patients. ``hospital`` is the record's
    own hospital column, when a simulation partitions one file by it (``data.partition:
    column``).
    """

    text: str
    specialty: str
    patient_id: str
    hospital: str | None = None


class DataError(ValueError):
    """A data problem the user can fix (missing file or column, malformed row, empty data set).

    It is a ``ValueError`` so generic callers still treat it as bad input, while the CLI can
    catch it specifically and show the message without a traceback. Messages always name
    the file or field involved and what was expected.
    """
