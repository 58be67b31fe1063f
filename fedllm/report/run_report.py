"""``report.json``: the machine-readable record of a run, rewritten atomically after every round.

The schema is documented in ``docs/report.md`` and versioned by ``schema_version``. Writing
after each round (to a temporary file renamed into place) means a crash loses at most the
round in flight and a reader never sees a half-written file. The ServerApp is its only writer
(through :class:`RunReport`); ``fedllm run`` writes what it adds beside it, in ``summary.json``
(:mod:`fedllm.report.run_summary`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedllm.config.schema import ExperimentConfig
from fedllm.privacy.accountant import HOSPITAL_NEIGHBOURING
from fedllm.privacy.inventory import reply_keys
from fedllm.storage.files import write_atomic

# 2: baselines, comparison and timing.cli_phases moved to fedllm run's summary.json
SCHEMA_VERSION = 2
REPORT_FILE = "report.json"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: unknown or unbounded values are written as null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def evaluation_description(config: ExperimentConfig) -> dict[str, Any]:
    """What the report's perplexities are, so nobody mistakes a simulation figure for a DP one."""
    release = config.evaluation.release
    if release == "exact":
        metric = (
            "token-weighted loss, exact: simulation only (the run generated or loaded the data)"
        )
    elif release == "dp":
        clip = config.evaluation.loss_clip
        metric = f"unit-weighted loss, each unit's loss clipped at {clip:g}" + (
            f", Gaussian noise σ={config.evaluation.noise_multiplier:g}×clip, charged"
            if config.privacy.enabled
            else ", exact (privacy disabled)"
        )
    else:
        metric = "none (evaluation off)"
    return {"release": release, "metric": metric, "simulation_only": release == "exact"}


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file renamed into place (atomic on POSIX)."""
    write_atomic(path, json.dumps(data, indent=2, allow_nan=False).encode(), mode=0o644)


def read_report_json(run_dir: Path) -> dict[str, Any]:
    """The parsed ``report.json`` of ``run_dir``, as the ServerApp (maybe another process) last
    wrote it."""
    return json.loads((run_dir / REPORT_FILE).read_text(encoding="utf-8"))


class RunReport:
    """Accumulates one run's rounds, privacy state and outcome, and keeps report.json current."""

    def __init__(self, run_dir: Path, config: ExperimentConfig) -> None:
        self.path = run_dir / REPORT_FILE
        self.started = time.monotonic()
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            "started_at": _utc_now(),
            "finished_at": None,
            "run_dir": str(run_dir),
            "config": config.model_dump(mode="json"),
            "privacy": {
                "enabled": config.privacy.enabled,
                "delta": config.privacy.delta if config.privacy.enabled else None,
                "accountant": config.privacy.accountant if config.privacy.enabled else None,
                "neighbouring": HOSPITAL_NEIGHBOURING if config.privacy.enabled else None,
                "unit": config.privacy.unit,
                "random_source": config.privacy.random_source,
                "ledger_scope": "run" if config.data.source == "synthetic" else "dataset",
                "hospitals": {},
            },
            "evaluation": evaluation_description(config),
            "releases": {},
            "initial": None,
            "rounds": [],
            "final": None,
            "timing": None,
            "checkpoint": None,
            "published_adapter": None,
        }

    @classmethod
    def resume(cls, run_dir: Path, config: ExperimentConfig, completed_rounds: int) -> RunReport:
        """Continue a run's report after a restart, keeping the rounds the ledger completed."""
        report = cls(run_dir, config)
        if (run_dir / REPORT_FILE).is_file():
            previous = read_report_json(run_dir)
            report.data.update({key: previous[key] for key in ("started_at", "initial", "privacy")})
            report.data["releases"] = previous.get("releases", {})
            report.data["rounds"] = [
                row for row in previous["rounds"] if row["round"] <= completed_rounds
            ]
        report.data["resumed_after_round"] = completed_rounds
        return report

    def write(self) -> None:
        """Atomically replace report.json with the current state."""
        write_json_atomically(self.path, self.data)

    def update_hospital_privacy(self, hospital: str, metrics: dict[str, Any]) -> None:
        """Mirror a hospital's cumulative privacy state from its latest reply."""
        self.data["privacy"]["hospitals"][hospital] = {
            "epsilon": _finite(metrics.get("epsilon")),
            "epsilon_cap": _finite(metrics.get("epsilon-cap")),
            "noise_multiplier": _finite(metrics.get("noise-multiplier")),
            "sample_rate": _finite(metrics.get("sample-rate")),
            "steps": int(metrics.get("steps", 0)),
            "rounds_participated": int(metrics.get("rounds-participated", 0)),
            "epsilon_confirmed": True,
        }

    def update_hospital_epsilon(self, hospital: str, epsilon: float, cap: float) -> None:
        """A hospital's ledger ε after a release outside training (a DP evaluation).

        A hospital may evaluate before it ever trains (or without ever training, when it
        cannot afford a round), and its evaluations are spent budget all the same.
        """
        entry = self.data["privacy"]["hospitals"].setdefault(
            hospital,
            {
                "noise_multiplier": None,
                "sample_rate": None,
                "steps": 0,
                "rounds_participated": 0,
                "epsilon_confirmed": True,
            },
        )
        entry["epsilon"] = _finite(epsilon)
        entry["epsilon_cap"] = _finite(cap)

    def record_unconfirmed_round(self, hospital: str, status: dict[str, Any]) -> None:
        """A hospital sent a round it never confirmed (reply lost or an error).

        It may have charged its ledger and trained, so the ε shown becomes its own projection
        from the round's status query (ε after one more round): an upper bound until a later
        reply reports the ledger's actual value.
        """
        entry = self.data["privacy"]["hospitals"].setdefault(
            hospital,
            {
                "noise_multiplier": None,
                "sample_rate": None,
                "steps": None,
                "rounds_participated": None,
            },
        )
        entry["epsilon"] = _finite(status.get("epsilon-next"))
        entry["epsilon_cap"] = _finite(status.get("epsilon-cap"))
        entry["epsilon_confirmed"] = False

    def observe_release(self, message: str, records: Mapping[str, Iterable[str]]) -> None:
        """Note the keys of a hospital's reply (``record.key``), for the release inventory.

        Kept in memory; the next write persists it. The list is what the server actually
        received, so it can be checked against docs/privacy.md.
        """
        seen = set(self.data["releases"].get(message, []))
        seen |= {f"{record}.{key}" for record, key in reply_keys(records)}
        self.data["releases"][message] = sorted(seen)

    def update_server_side_privacy(self, guarantee: dict[str, Any]) -> None:
        """Replace the hospital-level (server-side DP) guarantee and persist it at once.

        Written as soon as a round's noised aggregate exists, before the round's row: if the
        run stops before the row is added, a resumed run repeats the round and counts it
        again, an over-estimate of ε rather than a release nobody accounted for.
        """
        self.data["privacy"]["server_side"] = {
            **guarantee,
            "epsilon": _finite(guarantee.get("epsilon")),
        }
        self.write()

    def add_round(self, row: dict[str, Any]) -> None:
        """Append one finished round and persist."""
        self.data["rounds"].append(row)
        self.write()

    def finish(self, status: str, **sections: Any) -> None:
        """Record the outcome (``completed`` or ``failed``) plus any final sections."""
        self.data.update(sections)
        self.data["status"] = status
        self.data["finished_at"] = _utc_now()
        self.data.setdefault("timing", {})
        self.data["timing"] = {
            **(self.data["timing"] or {}),
            "total_s": round(time.monotonic() - self.started, 3),
        }
        self.write()
