"""``summary.json``: what ``fedllm run`` adds to a run, written beside the ServerApp's report.

``report.json`` has one writer, the ServerApp. The CLI's own results (the baselines it ran in
its process, their comparison with the federated model, and its phases' wall times) go here
instead, once, after the federation; ``fedllm run --json`` prints both as one object
(:func:`with_summary`). The schema is in ``docs/report.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedllm.report.run_report import REPORT_FILE, write_json_atomically

SUMMARY_FILE = "summary.json"
SUMMARY_SCHEMA_VERSION = 1


def run_summary(
    baselines: dict[str, Any], comparison: dict[str, float], cli_phases: dict[str, float]
) -> dict[str, Any]:
    """The summary of one ``fedllm run`` (``report`` names the file it complements)."""
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "report": REPORT_FILE,
        "baselines": baselines,
        "comparison": comparison,
        "cli_phases": {name: round(seconds, 3) for name, seconds in cli_phases.items()},
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (atomically) beside the run's report."""
    write_json_atomically(run_dir / SUMMARY_FILE, summary)


def with_summary(report: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The report with the summary's sections, as ``fedllm run --json`` prints it: ``baselines``
    and ``comparison`` at the top, the CLI's phases as ``timing.cli_phases``."""
    return {
        **report,
        "baselines": summary["baselines"],
        "comparison": summary["comparison"],
        "timing": {**(report.get("timing") or {}), "cli_phases": summary["cli_phases"]},
    }
