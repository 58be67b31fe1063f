"""The privacy-aware strategy: eligibility, utility, cohort QUBO, inclusion-weighted aggregation.

Each round:

1. **query**: every hospital reports its privacy status from its own ledger (spent ε, the ε
   it would reach after one more round, its cap) and, once per run, a noised data profile;
2. **eligibility** (hook :meth:`is_eligible`): only hospitals that can afford the round;
3. **utility** (hook :meth:`utility`): Oort-style statistical utility from the noised loss
   statistic each hospital released with its last update, times a straggler factor, plus an
   exploration bonus for rarely selected hospitals;
4. **cohort** (hook :meth:`solve_cohort`): ``random``, ``oort`` (top-K utility), or the cohort
   QUBO ``Σ u_i x_i − λ Σ s_ij x_i x_j, Σ x_i = K`` solved by the quantum-inspired sampler
   (``quantum``; the cohort is drawn from its low-energy ensemble) or exactly (``exact``);
5. **aggregate** (hook :meth:`aggregation_weights`): by default ``n_i / π_i`` normalised, with
   π_i the cohort's inclusion probability, or a robust rule, optionally with server-side DP.

Hospitals may drop out: every wait is bounded by ``strategy.round_timeout_s``, a round with
fewer than ``strategy.min_cohort`` successful replies is recorded as skipped (the global
adapter stays unchanged), and a hospital that was sent a train message but did not reply
(``lost``) or replied with an error (``failed``) has the round's planned privacy events
mirrored anyway: it charges its own ledger *before* training, so the server cannot know it
did not, and an over-estimate is the only safe error for a privacy ledger.

ML engineers subclass and override one hook; the Flower plumbing stays here. Every round is
recorded in the server's ledger (one transaction) and in ``report.json``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedllm.aggregation.rules import (
    apply_delta,
    coordinate_median,
    inclusion_weights,
    trimmed_mean,
    update_delta,
    weighted_mean,
)
from fedllm.aggregation.server_dp import ServerDpConfig, ServerSideDp
from fedllm.config.schema import ExperimentConfig
from fedllm.models.checkpoints import AdapterWriter
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.run_report import RunReport
from fedllm.selection.cohort import Cohort, draw_cohort
from fedllm.selection.instance import CohortInstance
from fedllm.selection.solvers import DEFAULT_SOLVER, SelectionResult, solve
from fedllm.selection.utility import (
    exploration_bonus,
    profile_similarity,
    statistical_utility,
    straggler_factor,
)
from fedllm.training.evaluation import EvaluationResult, combine

QUBO_SOLVERS = {"quantum": DEFAULT_SOLVER, "exact": "exact"}

log = structlog.get_logger(__name__)


@dataclass
class HospitalView:
    """Everything the server knows about one hospital: released statistics and observations."""

    node_id: int
    name: str
    status: dict[str, Any] = field(default_factory=dict)
    profile: list[float] | None = None
    square_loss_sum: float | None = None
    sample_size: float | None = None
    times_selected: int = 0
    unmirrored_events: list[dict[str, Any]] = field(default_factory=list)
    planned_events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_units(self) -> int:
        return int(self.status.get("num-units", 0))

    @property
    def speed(self) -> float:
        return float(self.status.get("speed", 1.0))


@dataclass
class Contribution:
    """One hospital's reply to a train message, as aggregation sees it."""

    hospital: str
    adapter: dict[str, torch.Tensor]
    num_examples: float
    inclusion_probability: float
    metrics: dict[str, Any]


class PrivacyAwareStrategy(FedAvg):
    """Budget-aware, utility- and redundancy-aware cohort selection with unbiased aggregation."""

    # Set by the ServerApp after construction (so subclass constructors need not pass it on):
    # writes each round's global adapter, see save_round_checkpoint.
    checkpoint_writer: AdapterWriter | None = None

    def __init__(
        self,
        config: ExperimentConfig,
        report: RunReport,
        run_context: dict[str, str],
        ledger: ServerLedger,
        round_offset: int = 0,
        query_timeout: float | None = None,
    ) -> None:
        super().__init__(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.config = config
        self.settings = config.strategy
        self.report = report
        self.run_context = run_context
        self.run_id = run_context["run-id"]
        self.ledger = ledger
        self.round_offset = round_offset
        self.query_timeout = (
            query_timeout if query_timeout is not None else config.strategy.round_timeout_s
        )
        self.rng = random.Random(config.run.seed + round_offset)
        self.ensemble_rng = np.random.default_rng(config.run.seed + round_offset)
        self.views: dict[int, HospitalView] = {}
        # node id -> one line saying why that hospital failed (its error reply, or lost)
        self.problems: dict[int, str] = {}
        self.server_dp = (
            ServerSideDp(
                ServerDpConfig(
                    mode=self.settings.server_dp.mode,
                    noise_multiplier=self.settings.server_dp.noise_multiplier,
                    clip_norm=self.settings.server_dp.clip_norm,
                    target_quantile=self.settings.server_dp.target_quantile,
                    clip_learning_rate=self.settings.server_dp.clip_learning_rate,
                )
            )
            if self.settings.server_dp.mode != "off"
            else None
        )
        self._round: dict[str, Any] = {}

    # ----------------------------------------------------------------- hooks to override

    def is_eligible(self, view: HospitalView, server_round: int) -> tuple[bool, str]:
        """A hospital may train if its own ledger says the next round fits under its cap."""
        status = view.status
        if not status:
            return False, "did not answer the status query"
        if "can-afford" in status and not status["can-afford"]:
            return False, (
                f"next round would reach ε={status['epsilon-next']:.3f} "
                f"> cap {status['epsilon-cap']:.3f}"
            )
        return True, ""

    def utility(self, view: HospitalView, server_round: int) -> float:
        """Statistical utility × straggler factor + exploration bonus (Oort), scaled to O(1)."""
        if view.square_loss_sum is None or view.sample_size is None:
            statistical = max((v.num_units for v in self.views.values()), default=1) * (
                self.settings.loss_clip
            )
        else:
            statistical = statistical_utility(
                view.num_units, view.square_loss_sum, view.sample_size
            )
        scale = sum(v.num_units for v in self.views.values()) or 1
        durations = [self.planned_duration(v) for v in self.views.values()]
        preferred = float(np.median(durations)) if durations else 0.0
        factor = straggler_factor(
            self.planned_duration(view), preferred, self.settings.straggler_penalty
        )
        bonus = exploration_bonus(
            server_round, view.times_selected, self.settings.exploration_weight
        )
        return statistical / scale * factor + bonus

    def planned_duration(self, view: HospitalView) -> float:
        """A round's expected work over the hospital's declared speed (public values only).

        Measured durations depend on the Poisson batch sizes, a function of the private data,
        so stragglers are judged by the planned steps × expected batch and the declared speed.
        """
        training = self.config.training
        return training.local_steps * training.batch_size / max(view.speed, 1e-9)

    def redundancy(self, views: Sequence[HospitalView]) -> np.ndarray:
        """s_ij: cosine similarity of the hospitals' noised specialty profiles."""
        return profile_similarity([view.profile for view in views])

    def solve_cohort(self, instance: CohortInstance, server_round: int) -> SelectionResult:
        """Solve the cohort QUBO with the configured solver."""
        name = self.settings.solver or QUBO_SOLVERS[self.settings.selection]
        seed = self.config.run.seed * 100_003 + server_round
        return solve(instance, solver=name, seed=seed, **self.settings.solver_options)

    def aggregation_weights(self, contributions: Sequence[Contribution]) -> list[float]:
        """Weights for the weighted rules: n_i, or n_i / π_i (unbiased under selection)."""
        sizes = [c.num_examples for c in contributions]
        if self.settings.aggregation == "inclusion-weighted":
            return inclusion_weights(sizes, [c.inclusion_probability for c in contributions])
        return sizes

    # ----------------------------------------------------------------- Flower plumbing

    def query_status(self, grid: Grid, release_profile: bool = False) -> None:
        """Refresh every hospital's status (and, once per run, its noised profile)."""
        content = {**self.run_context, "release-profile": int(release_profile)}
        messages = [
            Message(
                RecordDict({"config": ConfigRecord(content)}),
                message_type=MessageType.QUERY,
                dst_node_id=node_id,
            )
            for node_id in grid.get_node_ids()
        ]
        for view in self.views.values():
            view.status = {}
        for reply in grid.send_and_receive(messages, timeout=self.query_timeout):
            if reply.has_error():
                self.problems[reply.metadata.src_node_id] = reply.error.reason
                continue
            self.report.observe_release("query", reply.content)
            status = dict(reply.content["status"])
            node_id = reply.metadata.src_node_id
            view = self.views.setdefault(node_id, HospitalView(node_id, str(status["hospital"])))
            view.status = status
            if "profile" in status:
                view.profile = [float(x) for x in status.pop("profile")]
                view.unmirrored_events += json.loads(str(status.pop("profile-events")))
            if "round-events" in status:
                view.planned_events = json.loads(str(status.pop("round-events")))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Eligibility, utilities, cohort; then the global adapter to the cohort."""
        current = server_round + self.round_offset
        started = time.monotonic()
        self.query_status(grid, release_profile=self.config.needs_profiles)
        views = sorted(self.views.values(), key=lambda v: v.name)
        eligible, ineligible = [], {}
        for view in views:
            if not view.status and view.node_id not in self.problems:
                self.problems[view.node_id] = (
                    f"hospital {view.name}: did not answer the status query of round {current}"
                )
            ok, reason = self.is_eligible(view, current)
            if ok:
                eligible.append(view)
            else:
                ineligible[view.name] = reason
        utilities = {v.name: self.utility(v, current) for v in eligible}
        cohort = self.select(views, eligible, utilities, current)
        for view in views:
            if view.name in cohort.members:
                view.times_selected += 1
        nodes = [v.node_id for v in views if v.name in cohort.members]
        self._round = {
            "started": started,
            "global": arrays.to_torch_state_dict(),
            "cohort": cohort,
            "sent": {v.node_id: v.name for v in views if v.name in cohort.members},
            "row": {
                "round": current,
                "selected": sorted(cohort.members),
                "ineligible": ineligible,
                "utility": utilities,
                "inclusion_probability": cohort.inclusion_probabilities,
                "solver": cohort.solver,
            },
        }
        content = {**dict(config), **self.run_context, "server-round": current}
        record = RecordDict({"arrays": arrays, "config": ConfigRecord(content)})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def select(
        self,
        views: Sequence[HospitalView],
        eligible: Sequence[HospitalView],
        utilities: dict[str, float],
        server_round: int,
    ) -> Cohort:
        """The round's cohort and every hospital's probability of having been in it."""
        size = min(self.config.federation.cohort_size, len(eligible))
        names = [v.name for v in eligible]
        if size == 0:
            return Cohort(frozenset(), {v.name: 0.0 for v in views}, "none")
        mode = self.settings.selection
        if mode == "random":
            chosen = self.rng.sample(names, size)
            probability = size / len(names)
            return Cohort(
                frozenset(chosen),
                {v.name: (probability if v.name in names else 0.0) for v in views},
                "uniform",
            )
        if mode == "oort":
            ranked = sorted(names, key=lambda n: utilities[n], reverse=True)[:size]
            return Cohort(
                frozenset(ranked), {v.name: float(v.name in ranked) for v in views}, "top-k"
            )
        eligible_names = set(names)
        instance = CohortInstance(
            utility=np.array([utilities.get(v.name, 0.0) for v in views]),
            similarity=self.redundancy(views),
            k=size,
            lam=self.settings.redundancy_weight,
            eligible=np.array([v.name in eligible_names for v in views]),
        )
        result = self.solve_cohort(instance, server_round)
        cohort = draw_cohort(result, [v.name for v in views], self.ensemble_rng)
        return self.mix_with_uniform(cohort, names, size)

    def mix_with_uniform(self, cohort: Cohort, eligible: Sequence[str], size: int) -> Cohort:
        """With probability ``uniform_mix`` replace the cohort by a uniform one; exact π.

        π_i = (1 − m)·π_i(ensemble) + m·K/|eligible|: the mixture is still a known
        distribution, so n_i/π_i aggregation stays unbiased, and no eligible hospital's π
        falls below m·K/|eligible|, which bounds its weight.
        """
        mix = self.settings.uniform_mix
        if mix == 0:
            return cohort
        members = cohort.members
        if self.rng.random() < mix:
            members = frozenset(self.rng.sample(list(eligible), size))
        uniform = size / len(eligible)
        probabilities = {
            name: (1 - mix) * p + (mix * uniform if name in eligible else 0.0)
            for name, p in cohort.inclusion_probabilities.items()
        }
        return Cohort(members, probabilities, cohort.solver)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the cohort's adapters and mirror their privacy spending.

        Replies are matched to the hospitals the round was sent to; anything else (an error
        the SuperLink generates for an unavailable node, a stray reply) is ignored, and a
        hospital without a reply of its own is ``lost``.
        """
        row, cohort, sent = self._round["row"], self._round["cohort"], self._round["sent"]
        contributions, events, failed = [], {}, []
        for reply in replies:
            name = sent.get(reply.metadata.src_node_id)
            if name is None or name in events or name in failed:
                continue
            view = self.views[reply.metadata.src_node_id]
            if reply.has_error():
                failed.append(name)
                self.problems[reply.metadata.src_node_id] = reply.error.reason
                continue
            self.report.observe_release("train", reply.content)
            metrics = dict(reply.content["metrics"])
            self._observe(view, metrics)
            events[name] = json.loads(str(reply.content["privacy"]["events"]))
            contributions.append(
                Contribution(
                    name,
                    reply.content["arrays"].to_torch_state_dict(),
                    float(metrics["num-examples"]),
                    cohort.inclusion_probabilities[name],
                    metrics,
                )
            )
        lost = sorted(set(sent.values()) - set(events) - set(failed))
        for node_id, name in sent.items():
            if name in lost:
                self.problems[node_id] = (
                    f"hospital {name}: lost in round {row['round']} (no reply within "
                    f"{self.settings.round_timeout_s:g} s)"
                )
        for view in self.views.values():
            if view.name in failed or view.name in lost:
                events[view.name] = list(view.planned_events)
                self.report.record_unconfirmed_round(view.name, view.status)
        row["failed"] = sorted(failed)
        row["lost"] = lost
        row["hospital_events"] = events
        row["skipped"] = len(contributions) < self.settings.min_cohort
        if row["skipped"]:
            log.warning(
                "round.skipped",
                round=row["round"],
                replies=len(contributions),
                min_cohort=self.settings.min_cohort,
                lost=lost,
                failed=row["failed"],
            )
            return None, None
        aggregated = self.aggregate(contributions, self._round["global"])
        return ArrayRecord(aggregated), MetricRecord({"contributions": len(contributions)})

    def aggregate(
        self, contributions: Sequence[Contribution], current: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The new global adapter from the cohort's adapters."""
        adapters = [c.adapter for c in contributions]
        if self.server_dp is not None:
            deltas = [update_delta(a, current) for a in adapters]
            noised, record = self.server_dp.aggregate(
                deltas, None, cohort_size=self.config.federation.cohort_size
            )
            accounting = self._account_server_dp(self.server_dp.config)
            self._round["row"]["server_dp"] = record | accounting
            return apply_delta(current, noised)
        rule = self.settings.aggregation
        if rule == "trimmed-mean":
            return trimmed_mean(adapters, self.settings.trim_fraction)
        if rule == "median":
            return coordinate_median(adapters)
        return weighted_mean(adapters, self.aggregation_weights(contributions))

    def _account_server_dp(self, server_dp: ServerDpConfig) -> dict[str, Any]:
        """This round's hospital-level DP cost; also updates the report's composed ε.

        The cost depends on how the cohort was chosen (`selection_sensitivity`). Only the
        built-in uniform draw (selection ``random``, with neither ``select`` nor
        ``is_eligible`` overridden) counts as data-independent: any other choice, including a
        subclass's, may look at every hospital's statistics, so it gets the conservative bound.
        """
        from fedllm.aggregation.server_dp import (
            compose_server_side_guarantee,
            server_dp_accounting,
            server_side_delta,
        )

        cls = type(self)
        uniform = (
            self.settings.selection == "random"
            and cls.select is PrivacyAwareStrategy.select
            and cls.is_eligible is PrivacyAwareStrategy.is_eligible
        )
        accounting = server_dp_accounting(
            server_dp,
            self.config.federation.cohort_size,
            self.config.federation.num_hospitals,
            data_dependent_selection=not uniform,
        )
        delta, source = server_side_delta(self.config.privacy.enabled, self.config.privacy.delta)
        previous = self.report.data["privacy"].get("server_side")
        guarantee = compose_server_side_guarantee(previous, accounting, delta, source)
        self.report.update_server_side_privacy(guarantee)
        return accounting

    def _observe(self, view: HospitalView, metrics: dict[str, Any]) -> None:
        """Keep the released (noised) utility statistic and the hospital's privacy state."""
        if "utility-square-loss-sum" in metrics:
            view.square_loss_sum = float(metrics["utility-square-loss-sum"])
            view.sample_size = float(metrics["utility-sample-size"])
        if "epsilon" in metrics:
            self.report.update_hospital_privacy(view.name, metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every reachable hospital evaluates the new global adapter on its held-out split.

        Reachable: it answered this round's status query and did not drop out of training,
        so a hospital known to be gone does not cost the round another timeout.
        """
        current = server_round + self.round_offset
        content = {**dict(config), **self.run_context, "server-round": current}
        record = RecordDict({"arrays": arrays, "config": ConfigRecord(content)})
        self._round["arrays"] = arrays
        gone = set(self._round.get("row", {}).get("lost", []))
        nodes = [
            node_id
            for node_id in grid.get_node_ids()
            if node_id in self.views
            and self.views[node_id].status
            and self.views[node_id].name not in gone
        ]
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Close the round: perplexities, ε, ledger row (atomic), report row, checkpoint."""
        row = self._round["row"]
        # released before this round trained (profile, the initial evaluation): mirrored first,
        # then the round's events, then this evaluation's, in the order hospitals charged them
        earlier = {view.name: view.unmirrored_events for view in self.views.values()}
        for view in self.views.values():
            view.unmirrored_events = []
        row |= self.summarise_evaluation(replies)
        row["epsilon"] = {
            name: state["epsilon"]
            for name, state in self.report.data["privacy"]["hospitals"].items()
        }
        row["duration_s"] = round(time.monotonic() - self._round["started"], 3)
        checkpoint = self.save_round_checkpoint(row["round"], self._round["arrays"])
        events = row.pop("hospital_events")
        for view in self.views.values():
            merged = earlier[view.name] + events.get(view.name, []) + view.unmirrored_events
            if merged:
                events[view.name] = merged
            view.unmirrored_events = []
        self.ledger.record_round(
            self.run_id,
            row["round"],
            cohort=row["selected"],
            utilities=row["utility"],
            inclusion_probabilities=row["inclusion_probability"],
            ineligible=row["ineligible"],
            hospital_events=events,
            reported_epsilon={k: v for k, v in row["epsilon"].items() if v is not None},
            checkpoint=None if checkpoint is None else str(checkpoint),
        )
        self.report.add_round(row)
        if row["eval_loss"] is None:
            return None
        return MetricRecord({"eval-loss": row["eval_loss"]})

    def save_round_checkpoint(self, server_round: int, arrays: ArrayRecord) -> Path | None:
        """The global adapter after ``server_round`` as a peft directory, so a restarted server
        can resume; None when no `checkpoint_writer` was given (the round is not resumable).

        ``checkpoint_writer`` (set by the ServerApp, which holds the model peft needs) writes
        it atomically, and encrypted at rest when the server has a key ring.
        """
        if self.checkpoint_writer is None:
            return None
        path = Path(self.run_context["run-dir"]) / "checkpoints" / f"round-{server_round:04d}"
        self.checkpoint_writer(arrays.to_torch_state_dict(), path)
        return path

    def summarise_evaluation(self, replies: Iterable[Message]) -> dict[str, Any]:
        """Global (token-weighted) and per-hospital held-out loss and perplexity."""
        per_hospital = self.evaluation_by_hospital(replies)
        if not per_hospital:
            return {"eval_loss": None, "perplexity": None, "perplexity_per_hospital": {}}
        overall = combine(list(per_hospital.values()))
        return {
            "eval_loss": overall.mean_loss,
            "perplexity": overall.perplexity,
            "perplexity_per_hospital": {n: r.perplexity for n, r in per_hospital.items()},
        }

    def evaluation_by_hospital(self, replies: Iterable[Message]) -> dict[str, EvaluationResult]:
        """Each evaluating hospital's released loss sum and count (tokens, or units under DP)."""
        results = {}
        for reply in replies:
            view = self.views.get(reply.metadata.src_node_id)
            if reply.has_error():
                self.problems[reply.metadata.src_node_id] = reply.error.reason
                continue
            if view is None:
                continue
            self.report.observe_release("evaluate", reply.content)
            metrics = reply.content["metrics"]
            if "privacy" in reply.content:
                # a DP evaluation charged the hospital's ledger: mirror it with the next round
                view.unmirrored_events += json.loads(str(reply.content["privacy"]["events"]))
            if "epsilon" in metrics:
                self.report.update_hospital_epsilon(
                    view.name, float(metrics["epsilon"]), float(metrics["epsilon-cap"])
                )
            if not int(metrics.get("evaluated", 0)):
                continue
            loss_sum, count = float(metrics["eval-loss-sum"]), float(metrics["eval-count"])
            if self.config.evaluation.release == "dp":
                # the true sum lies in [0, L·count]; clamping the noised one is post-processing
                loss_sum = min(max(loss_sum, 0.0), self.config.evaluation.loss_clip * count)
            results[view.name] = EvaluationResult(loss_sum, count)
        return dict(sorted(results.items()))
