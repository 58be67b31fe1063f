"""Where a run's rounds are written: report.json, the server ledger, round checkpoints.

The strategy decides; this records. The ServerApp builds one :class:`RunRecorder` per run and
hands it to the strategy, which calls it at fixed points of a round:

- while reading replies: :meth:`observe_release` (every reply's keys, for the release
  inventory), :meth:`hospital_privacy` / :meth:`hospital_epsilon` (a hospital's own ledger
  state), :meth:`unconfirmed_round` (a lost or failed hospital's projected ε);
- once a server-side DP aggregate exists (``fedllm.strategies.server_dp``):
  :meth:`server_side_privacy`, persisted at once so a release is never unaccounted, and kept
  for the round's row;
- at the end of the round: :meth:`close_round`, which writes the checkpoint, then the ledger's
  round record (one transaction), then the report row, then logs the round's progress event
  (:mod:`fedllm.report.progress`).

It also carries the run's :class:`~fedllm.telemetry.tracing.Tracing` (disabled unless the
experiment has a ``tracing:`` section), from which the strategy makes one trace per round.

A strategy under test can be given a recorder on a temporary directory; nothing here decides
anything about selection or aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch

from fedllm.models.checkpoints import AdapterWriter
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.progress import ROUND_EVENT, round_progress
from fedllm.report.run_report import RunReport
from fedllm.telemetry.tracing import DISABLED, Tracing

log = structlog.get_logger(__name__)


@dataclass
class RunRecorder:
    """One run's report, server ledger and (optional) round-checkpoint writer.

    ``checkpoint_writer`` is set by the ServerApp, which holds the model peft needs; without
    one, rounds are recorded but not resumable. ``tracing`` is where round traces go.
    """

    report: RunReport
    ledger: ServerLedger
    run_id: str
    run_dir: Path
    checkpoint_writer: AdapterWriter | None = None
    tracing: Tracing = DISABLED
    _round_server_dp: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def observe_release(self, message: str, content: Mapping[str, Iterable[str]]) -> None:
        """Note the keys of one hospital reply to a ``message`` (query, train, evaluate)."""
        self.report.observe_release(message, content)

    def hospital_privacy(self, hospital: str, metrics: dict[str, Any]) -> None:
        """A hospital's cumulative privacy state, from its training reply."""
        self.report.update_hospital_privacy(hospital, metrics)

    def hospital_epsilon(self, hospital: str, epsilon: float, cap: float) -> None:
        """A hospital's ledger ε after a DP evaluation."""
        self.report.update_hospital_epsilon(hospital, epsilon, cap)

    def unconfirmed_round(self, hospital: str, status: dict[str, Any]) -> None:
        """A hospital sent a round it never confirmed: show its projected ε as an upper bound."""
        self.report.record_unconfirmed_round(hospital, status)

    @property
    def server_side_guarantee(self) -> dict[str, Any] | None:
        """The hospital-level guarantee so far (None before the first server-DP round)."""
        return self.report.data["privacy"].get("server_side")

    def server_side_privacy(
        self, guarantee: dict[str, Any], round_record: Mapping[str, Any] | None = None
    ) -> None:
        """Replace the hospital-level guarantee and persist it before the round's row, which
        will carry ``round_record`` (the round's mechanism and accounting) as ``server_dp``."""
        self.report.update_server_side_privacy(guarantee)
        if round_record is not None:
            self._round_server_dp = dict(round_record)

    def hospital_epsilons(self) -> dict[str, float | None]:
        """Every hospital's ε as the report mirrors it now."""
        return {
            name: state["epsilon"]
            for name, state in self.report.data["privacy"]["hospitals"].items()
        }

    def close_round(
        self,
        row: dict[str, Any],
        hospital_events: dict[str, list[dict[str, Any]]],
        global_adapter: Mapping[str, torch.Tensor],
    ) -> Path | None:
        """Checkpoint, ledger round record (atomic), then the report row; the checkpoint path.

        ``row`` is the report's round row (``round``, ``selected``, ``utility``,
        ``inclusion_probability``, ``ineligible``, ``epsilon`` ...); ``hospital_events`` the
        privacy events each hospital charged for it, in charge order.
        """
        if self._round_server_dp is not None:
            row["server_dp"], self._round_server_dp = self._round_server_dp, None
        checkpoint = self._save_checkpoint(row["round"], global_adapter)
        self.ledger.record_round(
            self.run_id,
            row["round"],
            cohort=row["selected"],
            utilities=row["utility"],
            inclusion_probabilities=row["inclusion_probability"],
            ineligible=row["ineligible"],
            hospital_events=hospital_events,
            reported_epsilon={k: v for k, v in row["epsilon"].items() if v is not None},
            checkpoint=None if checkpoint is None else str(checkpoint),
        )
        self.report.add_round(row)
        # the run's progress stream: `fedllm run` follows these, never report.json
        log.info(ROUND_EVENT, **round_progress(row, self.report.data["config"]["run"]["rounds"]))
        return checkpoint

    def _save_checkpoint(
        self, server_round: int, global_adapter: Mapping[str, torch.Tensor]
    ) -> Path | None:
        """The global adapter after ``server_round`` (atomically, encrypted at rest when the
        server has a key ring), so a restarted server can resume; None without a writer."""
        if self.checkpoint_writer is None:
            return None
        path = self.run_dir / "checkpoints" / f"round-{server_round:04d}"
        self.checkpoint_writer(global_adapter, path)
        return path
