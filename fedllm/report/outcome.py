"""How a run ended, from what it recorded: ``completed``, ``degraded`` or ``failed``.

A sweep script must be able to trust the exit code, so a run in which no round trained
anything is ``failed`` and a run in which any hospital failed or was lost is ``degraded``, each
with one line per cause (the hospital and why). Both are exits with a non-zero code; only a run
in which every hospital that was asked did its part is ``completed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunOutcome:
    """The run's status, why it is not ``completed`` (if it is not), and each hospital's cause."""

    status: str
    summary: str | None
    causes: list[str]


def run_outcome(
    rows: Sequence[Mapping[str, Any]], causes: Iterable[str], rounds_requested: int
) -> RunOutcome:
    """Judge a run by its round rows and the causes its strategy collected from hospitals."""
    unique = sorted(set(causes))
    skipped = [row["round"] for row in rows if row.get("skipped")]
    if rounds_requested > 0 and len(skipped) == len(rows):
        return RunOutcome("failed", "no round trained anything", unique)
    problems = []
    if unique or any(row.get("failed") or row.get("lost") for row in rows):
        problems.append("some hospitals failed or were lost")
    if skipped:
        problems.append(f"round(s) {', '.join(map(str, skipped))} trained nothing")
    if problems:
        return RunOutcome("degraded", "; ".join(problems), unique)
    return RunOutcome("completed", None, [])
