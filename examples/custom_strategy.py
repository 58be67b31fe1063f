"""Subclassing the strategy: override one hook, keep everything else.

``FairnessFirstStrategy`` boosts the utility of hospitals that have trained least, so small
rural hospitals are not crowded out by large ones; eligibility (privacy budgets), the cohort
QUBO, inclusion-weighted aggregation and the Flower round protocol are inherited unchanged, and
the ServerApp builds it with ``from_config`` and records its rounds as for the default one.

Use it from any experiment YAML:

    strategy:
      strategy_class: examples.custom_strategy:FairnessFirstStrategy

    fedllm run configs/default.yaml \
        --set strategy.strategy_class=examples.custom_strategy:FairnessFirstStrategy
"""

from __future__ import annotations

from fedllm.strategies.privacy_aware import HospitalView, PrivacyAwareStrategy


class FairnessFirstStrategy(PrivacyAwareStrategy):
    """Oort utility divided by (1 + rounds already trained)."""

    def utility(self, view: HospitalView, server_round: int) -> float:
        return super().utility(view, server_round) / (1 + view.times_selected)
