"""The run's progress as one stream: an event the ServerApp logs per round, read by the CLI.

The ServerApp logs JSON lines, which Flower forwards to ``flwr run --stream``; ``fedllm run``
reads that output (and copies it to ``flower.log``) and finds the events here in it, so it
never has to poll ``report.json`` while the ServerApp is writing it.
"""

from __future__ import annotations

import json
from typing import Any

STARTED_EVENT = "run.started"
ROUND_EVENT = "run.progress"


def round_progress(row: dict[str, Any], rounds: int) -> dict[str, Any]:
    """What a finished round's progress event says: from its report row and the run's length."""
    epsilons = [value for value in row["epsilon"].values() if value is not None]
    return {
        "round": row["round"],
        "rounds": rounds,
        "cohort": len(row["selected"]),
        "perplexity": row["perplexity"],
        "max_epsilon": max(epsilons) if epsilons else None,
    }


def progress_event(line: str) -> dict[str, Any] | None:
    """The run-progress event a line of ServerApp output carries (:data:`STARTED_EVENT` or
    :data:`ROUND_EVENT`), else None.

    Flower may put a prefix before a streamed line, so the JSON object is taken from the
    line's first ``{``.
    """
    start = line.find("{")
    if start < 0:
        return None
    try:
        event = json.loads(line[start:])
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") not in (STARTED_EVENT, ROUND_EVENT):
        return None
    return event
