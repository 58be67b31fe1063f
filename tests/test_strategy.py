"""The strategy's decisions without a federation: eligibility, selection modes, hooks, weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import structlog
import torch
from flwr.serverapp.strategy import FedAvg, Strategy

from fedllm.config import validate_config
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.run_report import RunReport
from fedllm.strategies import privacy_aware
from fedllm.strategies.privacy_aware import Contribution, HospitalView, PrivacyAwareStrategy
from fedllm.strategies.recorder import RunRecorder
from fedllm.strategies.rounds import RoundPlan

NAMES = ("alpha", "beta", "gamma", "delta", "epsilon")


def _strategy(tmp_path, cls=PrivacyAwareStrategy, **strategy):
    config = validate_config(
        {
            "federation": {"num_hospitals": 5, "cohort_size": 2},
            "strategy": strategy,
            "evaluation": {"baselines": []},
        }
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    report = RunReport(tmp_path, config)
    ledger = ServerLedger(f"sqlite:///{tmp_path / 'server.db'}")
    recorder = RunRecorder(report, ledger, "t", tmp_path)
    instance = cls.from_config(
        config, recorder=recorder, run_context={"run-dir": str(tmp_path), "run-id": "t"}
    )
    for node_id, name in enumerate(NAMES):
        instance.views[node_id] = HospitalView(
            node_id,
            name,
            status={
                "num-units": 100 * (node_id + 1),
                "speed": 1.0,
                "can-afford": 1,
                "epsilon": 1.0,
                "epsilon-next": 2.0,
                "epsilon-cap": 8.0,
            },
            profile=[1.0, 0.0] if node_id < 3 else [0.0, 1.0],
        )
    return instance


def _select(strategy, server_round=3):
    views = sorted(strategy.views.values(), key=lambda v: v.name)
    eligible = [v for v in views if strategy.is_eligible(v, server_round)[0]]
    utilities = {v.name: strategy.utility(v, server_round) for v in eligible}
    return strategy.select(views, eligible, utilities, server_round)


@pytest.mark.parametrize("selection", ["random", "oort", "quantum", "exact"])
def test_ineligible_hospitals_are_never_selected(tmp_path, selection):
    strategy = _strategy(tmp_path, selection=selection)
    for view in strategy.views.values():
        if view.name in ("delta", "epsilon", "alpha"):
            view.status["can-afford"] = 0
    for server_round in range(1, 6):
        cohort = _select(strategy, server_round)
        assert len(cohort.members) == 2
        assert cohort.members <= {"beta", "gamma"}
        assert cohort.inclusion_probabilities["delta"] == 0.0
        assert sum(cohort.inclusion_probabilities.values()) == pytest.approx(2.0)


def test_ineligibility_reason_names_the_cap(tmp_path):
    strategy = _strategy(tmp_path)
    view = strategy.views[0]
    view.status |= {"can-afford": 0, "epsilon-next": 9.5, "epsilon-cap": 8.0}
    ok, reason = strategy.is_eligible(view, 1)
    assert not ok
    assert "9.500" in reason
    assert "cap 8.000" in reason


def test_oort_picks_highest_utility_and_a_subclass_hook_changes_it(tmp_path):
    plain = _strategy(tmp_path, selection="oort")
    for view in plain.views.values():
        view.square_loss_sum, view.sample_size = 40.0, 10.0
    assert _select(plain).members == {"epsilon", "delta"}  # the largest hospitals

    class PreferSmall(PrivacyAwareStrategy):
        def utility(self, view, server_round):
            return 1.0 / view.num_units

    custom = _strategy(tmp_path / "custom", cls=PreferSmall, selection="oort")
    assert _select(custom).members == {"alpha", "beta"}


def test_quantum_selection_avoids_redundant_pairs(tmp_path):
    strategy = _strategy(tmp_path, selection="exact", redundancy_weight=10.0, uniform_mix=0.0)
    # three hospitals share one case mix, two share another: a diverse pair must win
    for _ in range(3):
        members = _select(strategy).members
        profiles = {tuple(strategy.views[NAMES.index(m)].profile) for m in members}
        assert len(profiles) == 2


def test_inclusion_weighting_divides_by_probability(tmp_path):
    strategy = _strategy(tmp_path, aggregation="inclusion-weighted")
    adapter = {"w": torch.zeros(2)}
    contributions = [
        Contribution("a", adapter, 100.0, 0.5, {}),
        Contribution("b", adapter, 100.0, 1.0, {}),
    ]
    weights = strategy.aggregation_weights(contributions)
    assert weights[0] / weights[1] == pytest.approx(2.0)
    plain = _strategy(tmp_path / "plain", aggregation="weighted")
    assert plain.aggregation_weights(contributions) == [100.0, 100.0]


def test_robust_rules_ignore_an_outlier(tmp_path):
    strategy = _strategy(tmp_path, aggregation="median")
    updates = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([1.2])}, {"w": torch.tensor([50.0])}]
    contributions = [Contribution(str(i), u, 1.0, 1.0, {}) for i, u in enumerate(updates)]
    merged = strategy.aggregate(contributions, {"w": torch.tensor([0.0])})
    assert float(merged["w"][0]) == pytest.approx(1.2)
    mean = _strategy(tmp_path / "mean", aggregation="weighted").aggregate(
        contributions, {"w": torch.tensor([0.0])}
    )
    assert float(mean["w"][0]) > 10


def test_utility_prefers_unexplored_and_penalises_stragglers(tmp_path):
    strategy = _strategy(tmp_path, selection="oort")
    for view in strategy.views.values():
        view.square_loss_sum, view.sample_size, view.times_selected = 40.0, 10.0, 3
    # stragglers are judged by declared speed (public), never by measured durations, which
    # depend on the Poisson batch sizes and so on the private data
    slow = strategy.views[2]
    slow.status["speed"] = 0.1
    fresh = strategy.views[1]
    fresh.times_selected = 0
    utilities = {v.name: strategy.utility(v, 5) for v in strategy.views.values()}
    assert utilities["gamma"] < utilities["alpha"]
    assert utilities["gamma"] < utilities["beta"]
    baseline = _strategy(tmp_path / "b", selection="oort")
    for view in baseline.views.values():
        view.square_loss_sum, view.sample_size, view.times_selected = 40.0, 10.0, 3
    assert utilities["beta"] > baseline.utility(baseline.views[1], 5)
    assert np.isfinite(list(utilities.values())).all()


def test_uniform_mix_bounds_inclusion_probabilities(tmp_path):
    strategy = _strategy(tmp_path, selection="exact", redundancy_weight=0.0, uniform_mix=0.2)
    for view in strategy.views.values():
        view.square_loss_sum, view.sample_size = 40.0, 10.0
    cohort = _select(strategy)
    # exact + no redundancy: the two largest hospitals always win the ensemble ...
    floor = 0.2 * 2 / 5
    probabilities = cohort.inclusion_probabilities
    assert probabilities["alpha"] == pytest.approx(floor, abs=1e-3)
    assert probabilities["epsilon"] == pytest.approx(0.8 + floor, abs=1e-3)
    assert sum(probabilities.values()) == pytest.approx(2.0)
    # ... and the uniform draw happens about 20 % of the time
    draws = [_select(strategy).members for _ in range(300)]
    share = sum(members != {"delta", "epsilon"} for members in draws) / len(draws)
    assert 0.1 < share < 0.3


def test_example_subclass_changes_one_hook_and_loads_by_name(tmp_path):
    from examples.custom_strategy import FairnessFirstStrategy
    from fedllm.strategies.server_app import load_strategy_class

    assert load_strategy_class("examples.custom_strategy:FairnessFirstStrategy") is (
        FairnessFirstStrategy
    )
    assert load_strategy_class(None) is PrivacyAwareStrategy
    with pytest.raises(TypeError, match="not a PrivacyAwareStrategy subclass"):
        load_strategy_class("fedllm.config:ExperimentConfig")
    fair = _strategy(tmp_path, cls=FairnessFirstStrategy, selection="oort")
    for view in fair.views.values():
        view.square_loss_sum, view.sample_size = 40.0, 10.0
    fair.views[4].times_selected = fair.views[3].times_selected = 5
    assert _select(fair).members == {"gamma", "beta"}


def test_the_strategy_is_a_flower_strategy_built_from_keywords(tmp_path, monkeypatch):
    """Keywords alone build it (no ExperimentConfig); it logs its own summary, not FedAvg's."""
    from_yaml = _strategy(tmp_path / "yaml", selection="oort")
    by_hand = PrivacyAwareStrategy(
        recorder=from_yaml.recorder, run_context={"run-id": "t"}, cohort_size=2, selection="oort"
    )
    assert isinstance(by_hand, Strategy)
    assert not isinstance(by_hand, FedAvg)
    by_hand.views = from_yaml.views
    for view in by_hand.views.values():
        view.square_loss_sum, view.sample_size = 40.0, 10.0
    assert _select(by_hand).members == _select(from_yaml).members == {"epsilon", "delta"}
    # the module's own logger, replaced: capture_logs misses a logger another test already
    # used (structlog caches it on first use)
    captured = structlog.testing.CapturingLogger()
    monkeypatch.setattr(privacy_aware, "log", captured)
    by_hand.summary()
    (summary,) = [call for call in captured.calls if call.args == ("strategy.summary",)]
    assert (summary.kwargs["selection"], summary.kwargs["cohort_size"]) == ("oort", 2)
    plan = RoundPlan(1, 0.0, {}, _select(by_hand), {}, {}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.round = 2  # type: ignore[misc]
