"""The privacy-aware strategy: the five hooks an ML engineer overrides, and their defaults.

Eligibility from each hospital's own privacy ledger (:meth:`~PrivacyAwareStrategy.is_eligible`),
Oort utility (:meth:`~PrivacyAwareStrategy.utility`), redundancy and the cohort QUBO
(:meth:`~PrivacyAwareStrategy.redundancy`, :meth:`~PrivacyAwareStrategy.solve_cohort`; the
modes, draw and uniform mix are ``fedllm.selection.cohort``'s) and inclusion-weighted
aggregation (:meth:`~PrivacyAwareStrategy.aggregation_weights`). The Flower round protocol is
``fedllm.strategies.cohort_rounds``; what is written down, the injected
``fedllm.strategies.recorder``; server-side DP, a wrapper around this strategy
(``fedllm.strategies.server_dp``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
import structlog
import torch

from fedllm.aggregation.rules import (
    coordinate_median,
    inclusion_weights,
    trimmed_mean,
    weighted_mean,
)
from fedllm.config.schema import ExperimentConfig
from fedllm.federation.node_registry import NodeRegistry
from fedllm.selection import cohort as cohorts
from fedllm.selection.instance import CohortInstance
from fedllm.selection.oort import oort_utility
from fedllm.selection.solvers import DEFAULT_SOLVER, SelectionResult, solve
from fedllm.selection.utility import profile_similarity
from fedllm.strategies.cohort_rounds import CohortRounds
from fedllm.strategies.recorder import RunRecorder
from fedllm.strategies.rounds import Contribution, HospitalView
from fedllm.strategies.settings import strategy_settings

QUBO_SOLVERS = {"quantum": DEFAULT_SOLVER, "exact": "exact"}
log = structlog.get_logger(__name__)
__all__ = ["Contribution", "HospitalView", "PrivacyAwareStrategy"]


class PrivacyAwareStrategy(CohortRounds):
    """Budget-aware, utility- and redundancy-aware cohort selection with unbiased aggregation.

    Keywords mirror ``strategy.*`` of the experiment YAML (:meth:`from_config` maps them):
    ``cohort_size`` (K), ``selection`` (random, oort, quantum, exact), ``solver`` and
    ``solver_options`` (QUBO solver; None: by selection), ``redundancy_weight`` (λ),
    ``uniform_mix`` (m), ``aggregation`` and ``trim_fraction``, ``exploration_weight``,
    ``straggler_penalty`` and ``loss_clip`` (Oort utility), ``planned_work`` (local steps ×
    batch size, public), ``seed`` (selection only; never DP noise). The round's wiring
    (``recorder``, ``run_context``, ``min_cohort``, ``round_timeout_s``, ...) goes to
    :class:`~fedllm.strategies.cohort_rounds.CohortRounds`.
    """

    def __init__(
        self,
        *,
        cohort_size: int,
        selection: str = "quantum",
        solver: str | None = None,
        solver_options: Mapping[str, Any] | None = None,
        redundancy_weight: float = 0.5,
        uniform_mix: float = 0.1,
        aggregation: str = "inclusion-weighted",
        trim_fraction: float = 0.2,
        exploration_weight: float = 0.5,
        straggler_penalty: float = 2.0,
        loss_clip: float = 5.0,
        planned_work: float = 1.0,
        seed: int = 0,
        **round_settings: Any,
    ) -> None:
        super().__init__(**round_settings)
        self.cohort_size, self.selection = cohort_size, selection
        self.solver, self.solver_options = solver, dict(solver_options or {})
        self.redundancy_weight, self.uniform_mix = redundancy_weight, uniform_mix
        self.aggregation, self.trim_fraction = aggregation, trim_fraction
        self.exploration_weight, self.straggler_penalty = exploration_weight, straggler_penalty
        self.loss_clip, self.planned_work, self.seed = loss_clip, planned_work, seed
        self.sampler = cohorts.CohortSampler.seeded(seed + self.round_offset, uniform_mix)

    @classmethod
    def from_config(
        cls,
        config: ExperimentConfig,
        *,
        recorder: RunRecorder,
        run_context: dict[str, str],
        round_offset: int = 0,
        query_timeout: float | None = None,
        node_registry: NodeRegistry | None = None,
    ) -> Self:
        """The strategy an experiment YAML describes (``fedllm.strategies.settings`` maps it)."""
        wiring = {
            "recorder": recorder,
            "run_context": run_context,
            "round_offset": round_offset,
            "node_registry": node_registry,
        }
        return cls(**wiring, query_timeout=query_timeout, **strategy_settings(config))

    # ----------------------------------------------------------------- hooks to override

    def is_eligible(self, view: HospitalView, server_round: int) -> tuple[bool, str]:
        """Whether a hospital may train in ``server_round``, and if not, why.

        Parameters
        ----------
        view : HospitalView
            The hospital; read ``view.status`` only (``{}`` when it did not answer this
            round's query; keys ``can-afford`` (0/1), ``epsilon``, ``epsilon-next`` and
            ``epsilon-cap`` (ε, from the hospital's own ledger) with ``privacy.enabled``).
        server_round : int
            The run's round, 1-based, counting rounds of a resumed run's earlier servers.

        Returns
        -------
        (bool, str)
            ``(True, "")``, or ``(False, reason)``: one line, recorded in ``rounds[].ineligible``.
            Invariant: a hospital whose next round would exceed its cap is never eligible.
            Overriding it makes server-side DP account the selection as data-dependent.
        """
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
        """How much training ``view``'s hospital in ``server_round`` is worth (Oort).

        Parameters
        ----------
        view : HospitalView
            An eligible hospital: ``square_loss_sum`` and ``sample_size`` (its last noised
            loss statistic, None before one), ``times_selected``, ``num_units`` and ``speed``
            (``view.status`` keys ``num-units``, ``speed``). ``self.views`` holds every
            hospital, for normalising.
        server_round : int
            The run's round, 1-based.

        Returns
        -------
        float
            Unitless, O(1): statistical utility / Σ num_units × straggler factor (≤ 1, from
            planned work over declared speed, never measured time) + exploration bonus.
            Finite; higher is better. Recorded in ``rounds[].utility``.
        """
        return oort_utility(
            view,
            list(self.views.values()),
            server_round,
            planned_work=self.planned_work,
            loss_clip=self.loss_clip,
            straggler_penalty=self.straggler_penalty,
            exploration_weight=self.exploration_weight,
        )

    def redundancy(self, views: Sequence[HospitalView]) -> np.ndarray:
        """How much each pair of hospitals would teach the model the same thing.

        Parameters
        ----------
        views : sequence of HospitalView
            Every hospital the round knows of, eligible or not, sorted by name; read
            ``view.profile`` (noised specialty counts, None when not released) and, if
            needed, ``view.status`` keys ``num-units``, ``hospital-index``.

        Returns
        -------
        numpy.ndarray
            N × N, symmetric, unitless, finite, ≥ 0 off the diagonal, in the order of
            ``views``; the QUBO subtracts ``redundancy_weight``·s_ij for every selected pair.
            Default: cosine similarity of the profiles (0 for a hospital without one).
        """
        return profile_similarity([view.profile for view in views])

    def solve_cohort(self, instance: CohortInstance, server_round: int) -> SelectionResult:
        """Solve the round's cohort QUBO (``selection`` quantum or exact only).

        Parameters
        ----------
        instance : CohortInstance
            ``utility`` (N,), ``similarity`` (N × N, from :meth:`redundancy`), ``k`` (the
            cohort size, ≤ eligible hospitals), ``lam`` (λ) and ``eligible`` (N booleans).
        server_round : int
            The run's round, 1-based (the default seeds the solver with it).

        Returns
        -------
        SelectionResult
            An ensemble of cohorts of exactly ``k`` eligible hospitals with weights; its
            ``inclusion_probabilities`` π_i lie in [0, 1], sum to ``k`` and are 0 for
            ineligible hospitals. The cohort is drawn from it, then mixed with a uniform draw.
        """
        name = self.solver or QUBO_SOLVERS[self.selection]
        seed = self.seed * 100_003 + server_round
        return solve(instance, solver=name, seed=seed, **self.solver_options)

    def aggregation_weights(self, contributions: Sequence[Contribution]) -> list[float]:
        """The weight of each hospital's adapter in the weighted mean.

        Parameters
        ----------
        contributions : sequence of Contribution
            The round's successful replies: ``hospital``, ``num_examples`` (units trained
            on, as released), ``inclusion_probability`` (π_i > 0, from the cohort draw),
            ``metrics`` (the reply's released metrics) and ``adapter``.

        Returns
        -------
        list of float
            One finite weight ≥ 0 per contribution, same order, not all 0; normalised by the
            caller. Default: n_i/π_i (``inclusion-weighted``: unbiased over the random
            cohort) or n_i (``weighted``). Not called by ``trimmed-mean``, ``median`` or
            server-side DP (equal weights: its sensitivity needs them).
        """
        sizes = [c.num_examples for c in contributions]
        if self.aggregation == "inclusion-weighted":
            return inclusion_weights(sizes, [c.inclusion_probability for c in contributions])
        return sizes

    # ----------------------------------------------------------------- selection and aggregation

    def select(
        self,
        views: Sequence[HospitalView],
        eligible: Sequence[HospitalView],
        utilities: dict[str, float],
        server_round: int,
    ) -> cohorts.Cohort:
        """The round's cohort and every hospital's probability of having been in it."""
        names, everyone = [v.name for v in eligible], [v.name for v in views]
        size = min(self.cohort_size, len(eligible))

        def solve() -> SelectionResult:
            similarity, lam = self.redundancy(views), self.redundancy_weight
            instance = cohorts.qubo_instance(utilities, similarity, names, everyone, size, lam)
            return self.solve_cohort(instance, server_round)

        return self.sampler.choose(self.selection, names, everyone, size, utilities, solve)

    def aggregate(
        self, contributions: Sequence[Contribution], current: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The new global adapter: ``aggregation``'s rule over the round's adapters."""
        adapters = [c.adapter for c in contributions]
        if self.aggregation == "trimmed-mean":
            return trimmed_mean(adapters, self.trim_fraction)
        if self.aggregation == "median":
            return coordinate_median(adapters)
        return weighted_mean(adapters, self.aggregation_weights(contributions))

    def summary(self) -> None:
        """Log the settings that decide a round (Flower calls this once, before round 1)."""
        settings = ("selection", "cohort_size", "aggregation", "uniform_mix", "min_cohort")
        named = {key: getattr(self, key) for key in (*settings, "round_timeout_s")}
        log.info("strategy.summary", strategy=type(self).__name__, **named)
