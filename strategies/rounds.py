"""What the strategy knows and carries through a round, and how it reads hospitals' replies.

:class:`HospitalView` is the server's picture of one hospital (mutable: it is refreshed every
round). A round's own state is frozen: :class:`RoundPlan` (made by ``configure_train``),
:class:`TrainOutcome` (made by ``aggregate_train``), gathered in :class:`RoundState`, which the
strategy replaces, never edits, as the round advances. The functions below turn Flower
messages into those objects and report every release to the run's recorder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedllm.federation.node_registry import NodeRegistry, claim_refusal
from fedllm.selection.cohort import Cohort
from fedllm.strategies.recorder import RunRecorder
from fedllm.training.evaluation import EvaluationResult, combine


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
        """Training-set size in privacy units (``status["num-units"]``; 0 before an answer)."""
        return int(self.status.get("num-units", 0))

    @property
    def speed(self) -> float:
        """Declared relative speed (``status["speed"]``; 1.0 before an answer)."""
        return float(self.status.get("speed", 1.0))


@dataclass
class Contribution:
    """One hospital's reply to a train message, as aggregation sees it."""

    hospital: str
    adapter: dict[str, torch.Tensor]
    num_examples: float
    inclusion_probability: float
    metrics: dict[str, Any]


@dataclass(frozen=True)
class RoundPlan:
    """A round as ``configure_train`` planned it: who was asked, why, and from which adapter."""

    round: int
    started: float  # time.monotonic() when the round began
    global_adapter: Mapping[str, torch.Tensor]
    cohort: Cohort
    sent: Mapping[int, str]  # node id -> hospital name, the train messages sent
    ineligible: Mapping[str, str]  # hospital -> is_eligible's reason
    utilities: Mapping[str, float]

    def row(self) -> dict[str, Any]:
        """The report row's selection fields."""
        return {
            "round": self.round,
            "selected": sorted(self.cohort.members),
            "ineligible": dict(self.ineligible),
            "utility": dict(self.utilities),
            "inclusion_probability": self.cohort.inclusion_probabilities,
            "solver": self.cohort.solver,
        }


@dataclass(frozen=True)
class TrainOutcome:
    """What came back: who failed or was lost, what each hospital charged."""

    failed: tuple[str, ...]
    lost: tuple[str, ...]
    hospital_events: Mapping[str, list[dict[str, Any]]]
    skipped: bool

    def row(self) -> dict[str, Any]:
        """The report row's training fields (a server-DP round's record is the recorder's)."""
        return {"failed": list(self.failed), "lost": list(self.lost), "skipped": self.skipped}


@dataclass(frozen=True)
class RoundState:
    """The round so far; ``evaluated`` is the global adapter sent out for evaluation."""

    plan: RoundPlan
    outcome: TrainOutcome | None = None
    evaluated: ArrayRecord | None = None


def messages(record: RecordDict, node_ids: Iterable[int], message_type: str) -> list[Message]:
    """One message per node, all carrying ``record``."""
    return [Message(record, message_type=message_type, dst_node_id=n) for n in node_ids]


def refresh_views(
    grid: Grid,
    views: dict[int, HospitalView],
    problems: dict[int, str],
    recorder: RunRecorder,
    content: dict[str, Any],
    timeout: float,
    registry: NodeRegistry | None = None,
) -> None:
    """Ask every connected hospital for its status; a non-answer leaves ``view.status`` empty.

    Profiles (once per run) and their privacy events, and the round's planned events, are
    popped out of the status into the view. With the operator's node ``registry`` (a deployed
    SuperLink), a node whose claimed hospital name is not the one its registered key belongs
    to is a problem, never a view: it takes no hospital's place.
    """
    for view in views.values():
        view.status = {}
    # one record per hospital: a message's content is its own, never shared
    sent = [
        Message(
            RecordDict({"config": ConfigRecord(content)}),
            message_type=MessageType.QUERY,
            dst_node_id=node_id,
        )
        for node_id in grid.get_node_ids()
    ]
    for reply in grid.send_and_receive(sent, timeout=timeout):
        if reply.has_error():
            problems[reply.metadata.src_node_id] = reply.error.reason
            continue
        recorder.observe_release("query", reply.content)
        status = dict(reply.content["status"])
        node_id = reply.metadata.src_node_id
        claimed = str(status["hospital"])
        refusal = None if registry is None else claim_refusal(registry, node_id, claimed)
        if refusal is not None:
            problems[node_id] = refusal
            views.pop(node_id, None)
            continue
        view = views.setdefault(node_id, HospitalView(node_id, str(status["hospital"])))
        view.status = status
        if "profile" in status:
            view.profile = [float(x) for x in status.pop("profile")]
            view.unmirrored_events += json.loads(str(status.pop("profile-events")))
        if "round-events" in status:
            view.planned_events = json.loads(str(status.pop("round-events")))


def read_train_replies(
    replies: Iterable[Message],
    plan: RoundPlan,
    views: Mapping[int, HospitalView],
    problems: dict[int, str],
    recorder: RunRecorder,
) -> tuple[list[Contribution], dict[str, list[dict[str, Any]]], list[str]]:
    """The contributions, each replying hospital's charged events, and the failed hospitals.

    Replies are matched to the hospitals the round was sent to; anything else (an error the
    SuperLink generates for an unavailable node, a stray or duplicate reply) is ignored.
    """
    contributions, events, failed = [], {}, []
    for reply in replies:
        name = plan.sent.get(reply.metadata.src_node_id)
        if name is None or name in events or name in failed:
            continue
        view = views[reply.metadata.src_node_id]
        if reply.has_error():
            failed.append(name)
            problems[reply.metadata.src_node_id] = reply.error.reason
            continue
        recorder.observe_release("train", reply.content)
        metrics = dict(reply.content["metrics"])
        if "utility-square-loss-sum" in metrics:
            view.square_loss_sum = float(metrics["utility-square-loss-sum"])
            view.sample_size = float(metrics["utility-sample-size"])
        if "epsilon" in metrics:
            recorder.hospital_privacy(view.name, metrics)
        events[name] = json.loads(str(reply.content["privacy"]["events"]))
        adapter = reply.content["arrays"].to_torch_state_dict()
        probability = plan.cohort.inclusion_probabilities[name]
        contributions.append(
            Contribution(name, adapter, float(metrics["num-examples"]), probability, metrics)
        )
    return contributions, events, failed


def evaluation_by_hospital(
    replies: Iterable[Message],
    views: Mapping[int, HospitalView],
    problems: dict[int, str],
    recorder: RunRecorder,
    loss_clip: float | None,
) -> dict[str, EvaluationResult]:
    """Each evaluating hospital's released loss sum and count (tokens, or units under DP).

    ``loss_clip`` is L of a DP evaluation (None otherwise): the true sum lies in
    [0, L·count], so the noised one is clamped there (post-processing). A DP evaluation's
    privacy events wait in ``view.unmirrored_events`` for the next round record.
    """
    results = {}
    for reply in replies:
        view = views.get(reply.metadata.src_node_id)
        if reply.has_error():
            problems[reply.metadata.src_node_id] = reply.error.reason
            continue
        if view is None:
            continue
        recorder.observe_release("evaluate", reply.content)
        metrics = reply.content["metrics"]
        if "privacy" in reply.content:
            view.unmirrored_events += json.loads(str(reply.content["privacy"]["events"]))
        if "epsilon" in metrics:
            recorder.hospital_epsilon(
                view.name, float(metrics["epsilon"]), float(metrics["epsilon-cap"])
            )
        if not int(metrics.get("evaluated", 0)):
            continue
        loss_sum, count = float(metrics["eval-loss-sum"]), float(metrics["eval-count"])
        if loss_clip is not None:
            loss_sum = min(max(loss_sum, 0.0), loss_clip * count)
        results[view.name] = EvaluationResult(loss_sum, count)
    return dict(sorted(results.items()))


def summarise(per_hospital: Mapping[str, EvaluationResult]) -> dict[str, Any]:
    """Global (token-weighted) and per-hospital held-out loss and perplexity."""
    if not per_hospital:
        return {"eval_loss": None, "perplexity": None, "perplexity_per_hospital": {}}
    overall = combine(list(per_hospital.values()))
    return {
        "eval_loss": overall.mean_loss,
        "perplexity": overall.perplexity,
        "perplexity_per_hospital": {n: r.perplexity for n, r in per_hospital.items()},
    }
