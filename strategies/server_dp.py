"""Server-side (hospital-level) DP as a wrapper around a Flower strategy.

:class:`HospitalLevelDpStrategy` adds ``fedllm.aggregation.server_dp.HospitalLevelDp`` to a
strategy the way Flower's ``DifferentialPrivacyServerSideFixedClipping`` does: it clips every
training reply's adapter to within C of the global one, lets the wrapped strategy aggregate the
clipped replies, adds Gaussian noise σ·C/m to the aggregate, and accounts the release at
hospital level (the run's report, through the recorder, when one is given). Unlike Flower's,
its noise comes from the OS's CSPRNG, it supports adaptive clipping, and its accounting
charges what the cohort selection lets through (sensitivity k·C, ``selection_sensitivity``).

When it is sound. The guarantee holds for the released sequence of global adapters if

1. the wrapped aggregate is a function of the clipped replies only and moves by at most C/m
   when one clipped reply is added, removed or changed: an equal-weight mean over the public
   cohort size m. fedllm's strategies (``CohortRounds`` subclasses) are switched to exactly
   that (`HospitalLevelDp.mean`; their weighting rule is not used). Flower's ``FedAvg`` and
   ``FedProx`` (whose proximal term lives in the clients) satisfy it when every sampled node
   replies with the same weight (``weighted_by_key``): the wrapper checks both each round,
   skipping a round with fewer than m replies and refusing unequal weights. Server optimisers
   (``FedAdam``, ``FedYogi``, ``FedAdagrad``, ``FedAvgM``) and robust rules (median, trimmed
   mean, Krum, Bulyan) are refused: an optimiser keeps state built from the un-noised
   aggregate and rescales it, and a robust rule's sensitivity is not C/m;
2. the selection is accounted as it is: ``data_dependent_selection`` decides whether a swap
   costs 2C (a uniform draw) or up to min(2K, 2(N−K))·C (a cohort chosen from the data). By
   default only ``PrivacyAwareStrategy``'s own ``random`` selection counts as data-independent
   (any other strategy, or one overriding ``select`` or ``is_eligible``, is data-dependent);
   Flower's uniform node sampling (``fraction_train``) is, so pass False around ``FedAvg``;
3. ``cohort_size`` (m = K) and ``num_hospitals`` (N) of the ``HospitalLevelDp`` are the
   wrapped strategy's number of training nodes per round and the federation's size.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import isfinite

import structlog
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedllm.aggregation.rules import AdapterState
from fedllm.aggregation.server_dp import HospitalLevelDp
from fedllm.config.schema import ExperimentConfig
from fedllm.strategies.cohort_rounds import CohortRounds
from fedllm.strategies.privacy_aware import PrivacyAwareStrategy
from fedllm.strategies.recorder import RunRecorder

log = structlog.get_logger(__name__)


def _plain_fedavg(strategy: Strategy) -> bool:
    """FedAvg's own weighted mean (FedAvg, FedProx), not an optimiser or robust rule on top."""
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train


class HospitalLevelDpStrategy(Strategy):
    """Clip, let ``strategy`` aggregate, noise, account: hospital-level DP around a strategy.

    Parameters
    ----------
    strategy : Strategy
        A ``CohortRounds`` subclass (fedllm's), or Flower's ``FedAvg`` / ``FedProx``; see the
        module docstring for why others are refused.
    server_dp : HospitalLevelDp
        The mechanism and its accounting (``HospitalLevelDp.from_config`` from a YAML).
    recorder : RunRecorder or None
        Where the guarantee and each round's record are written; a ``CohortRounds``'s own by
        default. Without one the guarantee is kept in :attr:`guarantee` only.
    data_dependent_selection : bool or None
        Whether the wrapped strategy's cohort depends on the hospitals' data; None: see
        :meth:`selection_is_data_dependent`.
    """

    def __init__(
        self,
        strategy: Strategy,
        server_dp: HospitalLevelDp,
        *,
        recorder: RunRecorder | None = None,
        data_dependent_selection: bool | None = None,
    ) -> None:
        if not (isinstance(strategy, CohortRounds) or _plain_fedavg(strategy)):
            raise ValueError(
                f"hospital-level DP cannot wrap {type(strategy).__name__}: its aggregate is "
                "not an equal-weight mean of the clipped updates (use a CohortRounds "
                "strategy, FedAvg or FedProx)"
            )
        self.strategy = strategy
        self.server_dp = server_dp
        if isinstance(strategy, CohortRounds):
            strategy.clipped_mean = server_dp.mean
            recorder = strategy.recorder if recorder is None else recorder
        self.recorder = recorder
        self.data_dependent_selection = data_dependent_selection
        self.guarantee = None if recorder is None else recorder.server_side_guarantee
        self._current: AdapterState = {}
        self._sent: set[int] = set()

    @classmethod
    def around(cls, strategy: Strategy, config: ExperimentConfig) -> Strategy:
        """``strategy`` wrapped as ``config.strategy.server_dp`` asks, or itself when off."""
        server_dp = HospitalLevelDp.from_config(config)
        return strategy if server_dp is None else cls(strategy, server_dp)

    def selection_is_data_dependent(self) -> bool:
        """As given; else only fedllm's built-in uniform draw, with neither ``select`` nor
        ``is_eligible`` overridden, ignores every hospital's statistics."""
        if self.data_dependent_selection is not None:
            return self.data_dependent_selection
        inner, base = self.strategy, PrivacyAwareStrategy
        return not (
            isinstance(inner, base)
            and inner.selection == "random"
            and type(inner).select is base.select
            and type(inner).is_eligible is base.is_eligible
        )

    def summary(self) -> None:
        """The DP settings, then the wrapped strategy's own summary."""
        config = self.server_dp.mechanism.config
        log.info(
            "server_dp.summary",
            mode=config.mode,
            noise_multiplier=config.noise_multiplier,
            clip_norm=self.server_dp.mechanism.clip_norm,
            cohort_size=self.server_dp.cohort_size,
            data_dependent_selection=self.selection_is_data_dependent(),
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global adapter the updates are clipped around and who was sent it."""
        self._current = arrays.to_torch_state_dict()
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = {message.metadata.dst_node_id for message in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip every reply's adapter, aggregate with the wrapped strategy, release with noise."""
        replies, first = list(replies), {}
        for reply in replies:  # one update per node sent the round: m bounds the mean
            node = reply.metadata.src_node_id
            if node in self._sent and not reply.has_error():
                first.setdefault(node, reply)
        answered = list(first.values())
        if _plain_fedavg(self.strategy) and not self._fedavg_round_is_sound(answered):
            return None, None
        unclipped = 0
        for reply in answered:
            records = list(reply.content.array_records.items())
            if len(records) != 1:
                raise ValueError(
                    f"server-side DP clips one ArrayRecord per reply, got {len(records)}"
                )
            ((name, record),) = records
            (clipped,), within = self.server_dp.clip([record.to_torch_state_dict()], self._current)
            reply.content[name] = ArrayRecord(clipped)
            unclipped += within
        # errors (failed hospitals) stay for the wrapped strategy's books; no stray or
        # duplicate update reaches its aggregate unclipped
        kept = {id(reply) for reply in answered}
        replies = [r for r in replies if r.has_error() or id(r) in kept]
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        released, record = self.server_dp.release(
            arrays.to_torch_state_dict(),
            self._current,
            replies=len(answered),
            unclipped=unclipped,
            data_dependent_selection=self.selection_is_data_dependent(),
        )
        self.record(record)
        return ArrayRecord(released), metrics

    def record(self, round_record: dict) -> None:
        """Compose the round onto the guarantee; persist both before anything else happens."""
        previous = self.guarantee if self.recorder is None else self.recorder.server_side_guarantee
        self.guarantee = self.server_dp.guarantee_after(previous, round_record)
        if self.recorder is not None:
            self.recorder.server_side_privacy(self.guarantee, round_record)

    def _fedavg_round_is_sound(self, answered: list[Message]) -> bool:
        """FedAvg divides by its replies and weighs by ``weighted_by_key``: the mean over m
        holds only if all m sampled nodes replied with one weight."""
        if len(answered) != self.server_dp.cohort_size:
            log.warning(
                "server_dp.round_withheld",
                replies=len(answered),
                cohort_size=self.server_dp.cohort_size,
                reason="FedAvg averages over its replies: fewer than m would need more noise",
            )
            return False
        key = self.strategy.weighted_by_key
        weights = [
            record.get(key)
            for reply in answered
            for record in reply.content.metric_records.values()
        ]
        positive = all(
            isinstance(w, int | float) and not isinstance(w, bool) and isfinite(w) and w > 0
            for w in weights
        )
        if len(weights) != len(answered) or not positive or len(set(weights)) > 1:
            raise ValueError(
                f"hospital-level DP around FedAvg needs one equal, positive {key!r} per reply "
                f"(got {weights}): unequal weights let one node move the mean by more than C/m"
            )
        return True

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated: evaluation sends the released adapter, post-processing."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated (evaluation metrics are the wrapped strategy's, not covered here)."""
        return self.strategy.aggregate_evaluate(server_round, replies)
