"""The round protocol under the privacy-aware strategy: query, plan, aggregate, record.

:class:`CohortRounds` implements Flower's message-API :class:`~flwr.serverapp.strategy.Strategy`
for rounds whose cohort is chosen from the hospitals' released status, and leaves the choices to
a subclass (``fedllm.strategies.privacy_aware.PrivacyAwareStrategy``): :meth:`is_eligible`,
:meth:`utility`, :meth:`select` and :meth:`aggregate`. Each round it

1. asks every hospital for its status (``configure_train``), asks the subclass who may train,
   what each is worth and who trains, and sends the global adapter to that cohort;
2. reads the replies (``aggregate_train``): a hospital sent a train message that did not reply
   (lost) or replied with an error (failed) has the round's planned privacy events mirrored
   anyway, since it charges its own ledger *before* training and an over-estimate is the only
   safe error; a round with fewer than ``min_cohort`` replies is skipped (adapter unchanged);
3. sends the new adapter to every reachable hospital for evaluation (``configure_evaluate``)
   and closes the round through the injected recorder (``aggregate_evaluate``).

Round state is a frozen :class:`~fedllm.strategies.rounds.RoundState`, replaced as the round
advances. Every wait is bounded by ``round_timeout_s``. Each round is one trace
(:class:`~fedllm.telemetry.tracing.RoundTracing` on the recorder's ``tracing``, disabled by
default): selection, each hospital's training, aggregation and evaluation are its children.
Server-side DP is a wrapper around this strategy (``fedllm.strategies.server_dp``), which sets
:attr:`CohortRounds.clipped_mean`.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import structlog
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedllm.aggregation.rules import AdapterState
from fedllm.federation.node_registry import NodeRegistry
from fedllm.selection.cohort import Cohort
from fedllm.strategies import rounds
from fedllm.strategies.recorder import RunRecorder
from fedllm.strategies.rounds import Contribution, HospitalView, RoundPlan, RoundState, TrainOutcome
from fedllm.telemetry.tracing import RoundTracing

log = structlog.get_logger(__name__)


class RoundLostError(RuntimeError):
    """No hospital answered a round's status query: the round cannot be held, and is not
    recorded as done, so a resumed run holds it again (an interrupted run ends this way)."""


class CohortRounds(Strategy):
    """Flower's four round methods around a subclass's eligibility, utility, cohort, aggregate.

    Parameters
    ----------
    recorder : RunRecorder
        Where each round is written (report row, server ledger, checkpoint).
    run_context : dict[str, str]
        ``run-dir``, ``run-id`` (and ``base-model-sha256``): sent with every message.
    min_cohort : int
        Fewest successful training replies for a round to count.
    round_timeout_s : float
        Bound on every wait of a round, in seconds (also the status query's, unless
        ``query_timeout`` is given).
    release_profiles : bool
        Whether hospitals release their noised data profile (once per run) with their status.
    evaluation_loss_clip : float or None
        L of a DP evaluation (the released loss sum is clamped to [0, L·count]); None otherwise.
    round_offset : int
        Rounds a resumed run already completed: Flower's round r is the run's r + offset.

    Attributes
    ----------
    clipped_mean : callable or None
        Set by a server-side DP wrapper: the replies are already clipped and are combined by
        it (an equal-weight mean over the public cohort size), never by :meth:`aggregate`.
    """

    def __init__(
        self,
        *,
        recorder: RunRecorder,
        run_context: dict[str, str],
        min_cohort: int = 1,
        round_timeout_s: float = 3600.0,
        release_profiles: bool = False,
        evaluation_loss_clip: float | None = None,
        round_offset: int = 0,
        query_timeout: float | None = None,
        node_registry: NodeRegistry | None = None,
    ) -> None:
        self.recorder = recorder
        self.node_registry = node_registry
        self.run_context = run_context
        self.min_cohort = min_cohort
        self.round_timeout_s = round_timeout_s
        self.release_profiles = release_profiles
        self.evaluation_loss_clip = evaluation_loss_clip
        self.round_offset = round_offset
        self.query_timeout = round_timeout_s if query_timeout is None else query_timeout
        self.views: dict[int, HospitalView] = {}
        self.problems: dict[int, str] = {}  # node id -> why that hospital failed, one line
        self.clipped_mean: Callable[[list[AdapterState], AdapterState], AdapterState] | None = None
        self.traces = RoundTracing(recorder.tracing)
        self._round: RoundState | None = None
        self._sent = (0, 0)  # time.time_ns() the round's last messages went to Flower, count

    @abstractmethod
    def is_eligible(self, view: HospitalView, server_round: int) -> tuple[bool, str]:
        """Whether a hospital may train this round; if not, why (one line)."""

    @abstractmethod
    def utility(self, view: HospitalView, server_round: int) -> float:
        """What training this hospital this round is worth (higher is better)."""

    @abstractmethod
    def select(
        self,
        views: Sequence[HospitalView],
        eligible: Sequence[HospitalView],
        utilities: dict[str, float],
        server_round: int,
    ) -> Cohort:
        """The round's cohort (a subset of ``eligible``) and every hospital's π_i."""

    @abstractmethod
    def aggregate(
        self, contributions: Sequence[Contribution], current: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The new global adapter from the round's successful replies."""

    def _state(self) -> RoundState:
        """This round's state; Flower calls configure_train first, so it exists."""
        if self._round is None:
            raise RuntimeError("a round method ran before configure_train")
        return self._round

    def query_status(self, grid: Grid, release_profile: bool = False) -> None:
        """Refresh every hospital's status (and, once per run, its noised profile)."""
        content = {**self.run_context, "release-profile": int(release_profile)}
        rounds.refresh_views(
            grid,
            self.views,
            self.problems,
            self.recorder,
            content,
            self.query_timeout,
            self.node_registry,
        )

    def _record(self, arrays: ArrayRecord, config: ConfigRecord, server_round: int) -> RecordDict:
        content = {**dict(config), **self.run_context, "server-round": server_round}
        return RecordDict({"arrays": arrays, "config": ConfigRecord(content)})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Eligibility, utilities, cohort; then the global adapter to the cohort."""
        current = server_round + self.round_offset
        self.traces.begin(current)
        try:
            with self.traces.selection(len(self.views)) as span:
                messages = self._plan_round(current, arrays, config, grid)
                span.set_attribute("fedllm.cohort", len(self._state().plan.sent))
        except BaseException:
            self.traces.end(failed=True)
            raise
        self._sent = (time.time_ns(), len(messages))
        return messages

    def _plan_round(
        self, current: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        started = time.monotonic()
        self.query_status(grid, release_profile=self.release_profiles)
        views = sorted(self.views.values(), key=lambda v: v.name)
        if views and not any(view.status for view in views):
            raise RoundLostError(
                f"round {current}: no hospital answered its status query; the round is not "
                "recorded (resume the run to hold it)"
            )
        verdicts = {v.name: self.is_eligible(v, current) for v in views}
        for view in views:
            if not view.status and view.node_id not in self.problems:
                self.problems[view.node_id] = (
                    f"hospital {view.name}: did not answer the status query of round {current}"
                )
        eligible = [v for v in views if verdicts[v.name][0]]
        utilities = {v.name: self.utility(v, current) for v in eligible}
        cohort = self.select(views, eligible, utilities, current)
        sent = {v.node_id: v.name for v in views if v.name in cohort.members}
        for view in views:
            view.times_selected += view.name in cohort.members
        ineligible = {name: reason for name, (ok, reason) in verdicts.items() if not ok}
        plan = RoundPlan(
            current, started, arrays.to_torch_state_dict(), cohort, sent, ineligible, utilities
        )
        self._round = RoundState(plan)
        return rounds.messages(self._record(arrays, config, current), sent, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the cohort's adapters; mirror lost and failed hospitals' planned events."""
        plan, replies = self._state().plan, list(replies)
        contributions, events, failed = rounds.read_train_replies(
            replies, plan, self.views, self.problems, self.recorder
        )
        lost = sorted(set(plan.sent.values()) - set(events) - set(failed))
        self._trace_training(replies, plan, failed_or_lost=set(failed) | set(lost))
        for node_id, name in plan.sent.items():
            if name in lost:
                self.problems[node_id] = (
                    f"hospital {name}: lost in round {plan.round} (no "
                    f"reply within {self.round_timeout_s:g} s)"
                )
        for view in self.views.values():
            if view.name in failed or view.name in lost:
                events[view.name] = list(view.planned_events)
                self.recorder.unconfirmed_round(view.name, view.status)
        skipped = len(contributions) < self.min_cohort
        outcome = TrainOutcome(tuple(sorted(failed)), tuple(lost), events, skipped)
        self._round = replace(self._state(), outcome=outcome)
        if skipped:
            log.warning(
                "round.skipped",
                round=plan.round,
                replies=len(contributions),
                min_cohort=self.min_cohort,
                lost=lost,
                failed=sorted(failed),
            )
            return None, None
        with self.traces.aggregation(len(contributions)):
            merged = (
                self.aggregate(contributions, plan.global_adapter)
                if self.clipped_mean is None
                else self.clipped_mean([c.adapter for c in contributions], plan.global_adapter)
            )
        return ArrayRecord(merged), MetricRecord({"contributions": len(contributions)})

    def _trace_training(
        self, replies: list[Message], plan: RoundPlan, failed_or_lost: set[str]
    ) -> None:
        """One span per hospital sent the round: from the instructions to its reply (to now,
        for a lost one), marked as an error unless it replied with an update."""
        if not self.traces.tracing.enabled:
            return
        now, sent_ns = time.time_ns(), self._sent[0]
        replied = {
            plan.sent[r.metadata.src_node_id]: int(r.metadata.created_at * 1e9)
            for r in replies
            if r.metadata.src_node_id in plan.sent
        }
        for name in sorted(plan.sent.values()):
            end = min(max(replied.get(name, now), sent_ns), now)
            self.traces.training(name, sent_ns, end, ok=name not in failed_or_lost)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every hospital that answered this round's query and was not lost evaluates."""
        outcome = self._round.outcome if self._round else None
        gone = set(outcome.lost) if outcome else set()
        if self._round is not None:
            self._round = replace(self._round, evaluated=arrays)
        nodes = [
            n
            for n in grid.get_node_ids()
            if n in self.views and self.views[n].status and self.views[n].name not in gone
        ]
        record = self._record(arrays, config, server_round + self.round_offset)
        self._sent = (time.time_ns(), len(nodes))
        return rounds.messages(record, nodes, MessageType.EVALUATE)

    def summarise_evaluation(self, replies: Iterable[Message]) -> dict[str, Any]:
        """Global (token-weighted) and per-hospital held-out loss and perplexity."""
        return rounds.summarise(
            rounds.evaluation_by_hospital(
                replies, self.views, self.problems, self.recorder, self.evaluation_loss_clip
            )
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Close the round: perplexities, ε, then the recorder's checkpoint, ledger and row."""
        state, replies = self._state(), list(replies)
        outcome = state.outcome
        if outcome is None:
            raise RuntimeError("aggregate_evaluate ran before aggregate_train")
        answered = sum(1 for reply in replies if not reply.has_error())
        self.traces.evaluation(self._sent[1], answered, self._sent[0], time.time_ns())
        # released before this round trained (profile, initial evaluation) first, then the
        # round's events, then this evaluation's: the order hospitals charged them in
        earlier = {view.name: view.unmirrored_events for view in self.views.values()}
        for view in self.views.values():
            view.unmirrored_events = []
        row = state.plan.row() | outcome.row() | self.summarise_evaluation(replies)
        row["epsilon"] = self.recorder.hospital_epsilons()
        row["duration_s"] = round(time.monotonic() - state.plan.started, 3)
        events = dict(outcome.hospital_events)
        for view in self.views.values():
            merged = earlier[view.name] + events.get(view.name, []) + view.unmirrored_events
            if merged:
                events[view.name] = merged
            view.unmirrored_events = []
        evaluated = state.evaluated
        adapter = (
            state.plan.global_adapter if evaluated is None else evaluated.to_torch_state_dict()
        )
        self.recorder.close_round(row, events, adapter)
        self.traces.end()
        if row["eval_loss"] is None:
            return None
        return MetricRecord({"eval-loss": row["eval_loss"]})
