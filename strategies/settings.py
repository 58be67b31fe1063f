"""From an experiment YAML to the strategy's constructor keywords, and back for preflight.

The ServerApp builds the strategy with ``from_config``, which passes every keyword here; a
subclass named by ``strategy.strategy_class`` must accept them all, which the preflight checks
with :func:`strategy_keywords` before any hospital is asked anything.
"""

from __future__ import annotations

import inspect
from typing import Any

from fedllm.config.schema import ExperimentConfig
from fedllm.strategies.cohort_rounds import CohortRounds


def strategy_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The constructor keywords an experiment decides (``strategy``, ``federation``, ...)."""
    s, training = config.strategy, config.training
    dp_evaluation = config.evaluation.release == "dp"
    return {
        "min_cohort": s.min_cohort,
        "round_timeout_s": s.round_timeout_s,
        "release_profiles": config.needs_profiles,
        "evaluation_loss_clip": config.evaluation.loss_clip if dp_evaluation else None,
        "cohort_size": config.federation.cohort_size,
        "selection": s.selection,
        "solver": s.solver,
        "solver_options": s.solver_options,
        "redundancy_weight": s.redundancy_weight,
        "uniform_mix": s.uniform_mix,
        "aggregation": s.aggregation,
        "trim_fraction": s.trim_fraction,
        "exploration_weight": s.exploration_weight,
        "straggler_penalty": s.straggler_penalty,
        "loss_clip": s.loss_clip,
        "planned_work": training.local_steps * training.batch_size,
        "seed": config.run.seed,
    }


def strategy_keywords() -> tuple[str, ...]:
    """Every keyword ``from_config`` passes to the constructor (preflight checks subclasses)."""
    # here, not at the top: privacy_aware imports this module
    from fedllm.strategies.privacy_aware import PrivacyAwareStrategy

    named = (
        inspect.signature(function).parameters.values()
        for function in (PrivacyAwareStrategy.__init__, CohortRounds.__init__)
    )
    return tuple(p.name for ps in named for p in ps if p.kind is inspect.Parameter.KEYWORD_ONLY)
