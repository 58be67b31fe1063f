"""FedAvg over a cohort of hospitals that can still afford the round, with a full run report.

Each round starts by asking every hospital for its privacy status (a QUERY message answered
from the hospital's own ledger). Only hospitals whose ledger says the next round fits under
their cap are eligible, and the cohort is drawn uniformly at random from them, so the server
never asks a hospital to overspend. Aggregation is Flower's sample-size-weighted FedAvg.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedllm.report.run_report import RunReport
from fedllm.training.evaluation import EvaluationResult, combine


class BudgetAwareFedAvg(FedAvg):
    """FedAvg whose cohort excludes hospitals that cannot afford another round."""

    def __init__(
        self,
        cohort_size: int,
        report: RunReport,
        run_context: dict[str, str],
        seed: int = 0,
        query_timeout: float = 600.0,
    ) -> None:
        super().__init__(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.cohort_size = cohort_size
        self.report = report
        self.run_context = run_context
        self.rng = random.Random(seed)
        self.query_timeout = query_timeout
        self.node_names: dict[int, str] = {}
        self._round: dict[str, Any] = {}

    def query_status(self, grid: Grid) -> dict[int, dict[str, Any]]:
        """Every connected hospital's status, keyed by node id (non-answering nodes omitted)."""
        messages = [
            Message(
                RecordDict({"config": ConfigRecord(dict(self.run_context))}),
                message_type=MessageType.QUERY,
                dst_node_id=node_id,
            )
            for node_id in grid.get_node_ids()
        ]
        statuses = {}
        for reply in grid.send_and_receive(messages, timeout=self.query_timeout):
            if reply.has_error():
                continue
            status = dict(reply.content["status"])
            statuses[reply.metadata.src_node_id] = status
            self.node_names[reply.metadata.src_node_id] = str(status["hospital"])
        return statuses

    def is_eligible(self, status: dict[str, Any]) -> tuple[bool, str]:
        """A hospital may train if its ledger can afford the next round."""
        if "can-afford" in status and not status["can-afford"]:
            return False, (
                f"next round would reach ε={status['epsilon-next']:.3f} "
                f"> cap {status['epsilon-cap']:.3f}"
            )
        return True, ""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Select the cohort among eligible hospitals and send them the global adapter."""
        started = time.monotonic()
        statuses = self.query_status(grid)
        eligible, ineligible = [], {}
        for node_id, status in sorted(statuses.items()):
            ok, reason = self.is_eligible(status)
            if ok:
                eligible.append(node_id)
            else:
                ineligible[self.node_names[node_id]] = reason
        cohort = sorted(self.rng.sample(eligible, min(self.cohort_size, len(eligible))))
        self._round = {
            "started": started,
            "row": {
                "round": server_round,
                "selected": [self.node_names[n] for n in cohort],
                "ineligible": ineligible,
            },
        }
        config = ConfigRecord({**dict(config), **self.run_context, "server-round": server_round})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, cohort, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg the adapters; mirror each hospital's privacy state into the report."""
        replies = list(replies)
        row = self._round["row"]
        losses, weights, train_seconds = [], [], {}
        for reply in replies:
            if reply.has_error():
                continue
            metrics = dict(reply.content["metrics"])
            name = self.node_names[reply.metadata.src_node_id]
            losses.append(float(metrics["train-loss"]))
            weights.append(float(metrics["num-examples"]))
            train_seconds[name] = float(metrics["train-seconds"])
            if "epsilon" in metrics:
                self.report.update_hospital_privacy(name, metrics)
        row["failed"] = [
            self.node_names.get(r.metadata.src_node_id, str(r.metadata.src_node_id))
            for r in replies
            if r.has_error()
        ]
        row["train_loss"] = (
            sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)
            if weights
            else None
        )
        row["train_seconds"] = train_seconds
        return super().aggregate_train(server_round, [r for r in replies if not r.has_error()])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every hospital evaluates the new global adapter on its held-out split."""
        config = ConfigRecord({**dict(config), **self.run_context, "server-round": server_round})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, list(grid.get_node_ids()), MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Token-weighted global perplexity plus each hospital's; closes the round's row."""
        summary = self.summarise_evaluation(replies)
        row = self._round["row"]
        row |= summary | {
            "epsilon": {
                name: state["epsilon"]
                for name, state in self.report.data["privacy"]["hospitals"].items()
            },
            "duration_s": round(time.monotonic() - self._round["started"], 3),
        }
        self.report.add_round(row)
        if summary["eval_loss"] is None:
            return None
        return MetricRecord({"eval-loss": summary["eval_loss"]})

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
        """Each answering hospital's held-out loss sum and token count."""
        results = {}
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content["metrics"]
            name = self.node_names.get(reply.metadata.src_node_id)
            if name is None:
                continue
            results[name] = EvaluationResult(
                float(metrics["eval-loss-sum"]), int(metrics["eval-tokens"])
            )
        return dict(sorted(results.items()))
