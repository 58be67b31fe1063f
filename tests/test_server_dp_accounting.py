"""Server-side (hospital-level) DP accounts for what the cohort selection really lets through.

A fixed-size cohort gives a removed hospital's place to another one, and a data-driven
selection can reshuffle the whole cohort, so the sensitivity of the sum of clipped deltas is
not always C. These tests measure that movement on real selections and aggregates, and check
the reported ε against dp_accounting's PLD built here, independently of the project's
accountant.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.supercore.task_identity import TaskIdentity

from fedllm.aggregation import ServerDpConfig, ServerSideDp, global_norm, server_dp_event
from fedllm.aggregation.server_dp import (
    HospitalLevelDp,
    compose_server_side_guarantee,
    selection_sensitivity,
    server_dp_accounting,
)
from fedllm.config import validate_config
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.run_report import RunReport
from fedllm.strategies.privacy_aware import HospitalView, PrivacyAwareStrategy
from fedllm.strategies.recorder import RunRecorder
from fedllm.strategies.server_dp import HospitalLevelDpStrategy

NAMES = ("alpha", "beta", "gamma", "delta", "epsilon")
CLIP = 0.5
SIGMA = 1.5


def _pld_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of `rounds` sensitivity-1 Gaussians under add/remove, straight from dp_accounting."""
    accountant = PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
    )
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    return accountant.compose(event, rounds).get_epsilon(delta)


def _strategy(
    tmp_path, num_hospitals: int, cohort_size: int, cls=PrivacyAwareStrategy, **overrides
) -> HospitalLevelDpStrategy:
    """The strategy a YAML with server-side DP describes: ``cls`` inside the DP wrapper."""
    strategy_settings = {
        "server_dp": {"mode": "fixed", "noise_multiplier": SIGMA, "clip_norm": CLIP},
        **overrides.pop("strategy", {}),
    }
    config = validate_config(
        {
            "federation": {"num_hospitals": num_hospitals, "cohort_size": cohort_size},
            "strategy": strategy_settings,
            "evaluation": {"baselines": []},
            **overrides,
        }
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    report = RunReport(tmp_path, config)
    ledger = ServerLedger(f"sqlite:///{tmp_path / 'server.db'}")
    recorder = RunRecorder(report, ledger, "t", tmp_path)
    strategy = cls.from_config(
        config, recorder=recorder, run_context={"run-dir": str(tmp_path), "run-id": "t"}
    )
    for node_id, name in enumerate(NAMES[:num_hospitals]):
        strategy.views[node_id] = HospitalView(
            node_id,
            name,
            status={"num-units": 100, "speed": 1.0, "can-afford": 1},
        )
    return HospitalLevelDpStrategy.around(strategy, config)


def _select(wrapped: HospitalLevelDpStrategy, server_round: int = 3) -> frozenset[str]:
    strategy = wrapped.strategy
    views = sorted(strategy.views.values(), key=lambda v: v.name)
    eligible = [v for v in views if strategy.is_eligible(v, server_round)[0]]
    utilities = {v.name: strategy.utility(v, server_round) for v in eligible}
    return strategy.select(views, eligible, utilities, server_round).members


def _without(wrapped: HospitalLevelDpStrategy, name: str) -> None:
    """The neighbouring federation: the same hospitals, less one."""
    strategy = wrapped.strategy
    node_id = next(node for node, view in strategy.views.items() if view.name == name)
    del strategy.views[node_id]


def _clipped_sum(deltas: dict[str, OrderedDict], cohort: frozenset[str]) -> torch.Tensor:
    """m × the server-DP mean with negligible noise: the sum of the cohort's clipped deltas."""
    dp = ServerSideDp(ServerDpConfig("fixed", noise_multiplier=1e-12, clip_norm=CLIP))
    members = sorted(cohort)
    mean, _ = dp.aggregate(
        [deltas[name] for name in members], None, torch.Generator().manual_seed(0)
    )
    return mean["w"].double() * len(members)


def _direction(sign: float, scale: float = 3.0) -> OrderedDict:
    return OrderedDict(w=torch.tensor([sign * scale * CLIP, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("cohort_size", "num_hospitals", "data_dependent", "expected"),
    [
        (3, 3, False, 1),
        (3, 3, True, 1),
        (1, 5, False, 2),
        (2, 5, False, 2),
        (4, 5, False, 2),
        (7, 100, False, 2),
        (1, 5, True, 2),
        (4, 5, True, 2),
        (2, 5, True, 4),
        (4, 8, True, 8),
        (7, 10, True, 6),
    ],
)
def test_sensitivity_multiple_follows_the_selection(
    cohort_size: int, num_hospitals: int, data_dependent: bool, expected: int
) -> None:
    assert (
        selection_sensitivity(cohort_size, num_hospitals, data_dependent_selection=data_dependent)
        == expected
    )
    for mode in ("fixed", "adaptive"):
        config = ServerDpConfig(mode, noise_multiplier=SIGMA, clip_norm=CLIP)
        event = server_dp_event(
            config, cohort_size, num_hospitals, False, data_dependent_selection=data_dependent
        )
        assert event == dp_accounting.GaussianDpEvent(SIGMA / expected)
        record = server_dp_accounting(
            config, cohort_size, num_hospitals, data_dependent_selection=data_dependent
        )
        assert record["sensitivity_clip_multiple"] == expected
        assert record["noise_multiplier"] == SIGMA
        assert record["effective_noise_multiplier"] == pytest.approx(SIGMA / expected)
        assert record["event"]["kind"] == "gaussian_release"
        assert record["event"]["noise_multiplier"] == pytest.approx(SIGMA / expected)
        assert record["event"]["count"] == 1
        assert record["amplification"] is False
        if mode == "adaptive":
            # A swap moves the centred unclipped count by b_h' − b_h, at most 1 = k/2.
            assert record["clipped_count_sensitivity"] == expected / 2


def test_uniform_poisson_selection_keeps_sensitivity_c_and_amplifies() -> None:
    config = ServerDpConfig("fixed", noise_multiplier=SIGMA, clip_norm=CLIP)
    event = server_dp_event(config, 2, 5, True, data_dependent_selection=True)
    assert event == dp_accounting.PoissonSampledDpEvent(0.4, dp_accounting.GaussianDpEvent(SIGMA))


def test_uniform_substitution_moves_the_clipped_sum_by_2c(tmp_path) -> None:
    """K = 2 of N = 3, random: removing a selected hospital hands its place to the third."""
    strategy = _strategy(tmp_path, 3, 2, strategy={"selection": "random"})
    cohort = _select(strategy)
    removed = sorted(cohort)[0]
    _without(strategy, removed)
    neighbour_cohort = _select(strategy)
    (entered,) = neighbour_cohort - cohort
    assert removed not in neighbour_cohort

    deltas = {name: _direction(0.1, 1.0) for name in NAMES[:3]}
    deltas[removed] = _direction(+1.0)  # clipped to +C
    deltas[entered] = _direction(-1.0)  # clipped to −C
    moved = float((_clipped_sum(deltas, cohort) - _clipped_sum(deltas, neighbour_cohort)).norm())
    assert moved == pytest.approx(2 * CLIP, rel=1e-9)
    assert moved > 1.5 * CLIP  # the old "sensitivity C" did not cover it
    assert selection_sensitivity(2, 3, data_dependent_selection=False) * CLIP >= moved - 1e-12


def test_data_dependent_selection_can_swap_the_whole_cohort(tmp_path) -> None:
    """Oort, K = 2 of N = 5: removing an UNSELECTED hospital replaces both members.

    Utilities are normalised by Σ n_j: without the very large `epsilon`, the high-loss
    `alpha` and `beta` outscore the exploration bonus of the never-selected `gamma`, `delta`.
    """
    strategy = _strategy(tmp_path, 5, 2, strategy={"selection": "oort"})
    views = {view.name: view for view in strategy.strategy.views.values()}
    for name in ("alpha", "beta"):
        views[name].square_loss_sum, views[name].sample_size = 40.0, 10.0
        views[name].times_selected = 8
    for name in ("gamma", "delta"):
        views[name].square_loss_sum, views[name].sample_size = 0.0, 10.0
    views["epsilon"].status["num-units"] = 10_000
    views["epsilon"].square_loss_sum, views["epsilon"].sample_size = 0.0, 10.0
    views["epsilon"].times_selected = 8

    cohort = _select(strategy)
    assert cohort == {"gamma", "delta"}
    _without(strategy, "epsilon")
    neighbour_cohort = _select(strategy)
    assert neighbour_cohort == {"alpha", "beta"}

    deltas = {name: _direction(-1.0) for name in ("alpha", "beta")}
    deltas |= {name: _direction(+1.0) for name in ("gamma", "delta", "epsilon")}
    moved = float((_clipped_sum(deltas, cohort) - _clipped_sum(deltas, neighbour_cohort)).norm())
    assert moved == pytest.approx(4 * CLIP, rel=1e-9)
    assert moved > 2 * CLIP + 1e-9  # a single substitution's 2C does not cover it
    assert selection_sensitivity(2, 5, data_dependent_selection=True) * CLIP >= moved - 1e-12


def _aggregate_rounds(strategy: HospitalLevelDpStrategy, rounds: int) -> list[dict]:
    """Clip, aggregate and release fixed replies `rounds` times, as the wrapper does each
    round; the round records (the report's `server_dp` rows)."""
    current = {"w": torch.zeros(2)}
    adapters = [{"w": torch.tensor([0.3, -0.2])}] * strategy.strategy.cohort_size
    records = []
    for _ in range(rounds):
        dp = strategy.server_dp
        clipped, unclipped = dp.clip(adapters, current)
        merged, record = dp.release(
            dp.mean(clipped, current),
            current,
            replies=len(adapters),
            unclipped=unclipped,
            data_dependent_selection=strategy.selection_is_data_dependent(),
        )
        strategy.record(record)
        assert global_norm({"w": merged["w"] - current["w"]}) > 0
        records.append(record)
    return records


@pytest.mark.parametrize(
    ("num_hospitals", "cohort_size", "selection", "multiple"),
    [(3, 2, "random", 2), (3, 3, "random", 1), (3, 3, "oort", 1), (5, 2, "oort", 4)],
)
def test_report_carries_the_hospital_level_epsilon(
    tmp_path, num_hospitals: int, cohort_size: int, selection: str, multiple: int
) -> None:
    strategy = _strategy(tmp_path, num_hospitals, cohort_size, strategy={"selection": selection})
    rounds = 4
    records = _aggregate_rounds(strategy, rounds)
    assert all(r["sensitivity_clip_multiple"] == multiple for r in records)
    assert all(r["noise_multiplier"] == SIGMA for r in records)
    assert all(r["effective_noise_multiplier"] == pytest.approx(SIGMA / multiple) for r in records)

    delta = strategy.server_dp.delta
    expected = _pld_epsilon(SIGMA / multiple, rounds, delta)
    on_disk = json.loads((tmp_path / "report.json").read_text())["privacy"]["server_side"]
    for server_side in (strategy.recorder.report.data["privacy"]["server_side"], on_disk):
        assert server_side["epsilon"] == pytest.approx(expected, rel=1e-3)
        assert server_side["delta"] == delta
        assert server_side["rounds"] == rounds
        assert server_side["sensitivity_clip_multiple"] == multiple
        assert server_side["noise_multiplier"] == SIGMA
        assert server_side["unit"] == "hospital"
        assert server_side["accountant"] == "pld"
    if multiple > 1:  # the substitution costs visibly more than "sensitivity C" claimed
        assert expected > 1.5 * _pld_epsilon(SIGMA, rounds, delta)


def test_a_subclass_that_selects_is_never_treated_as_uniform(tmp_path) -> None:
    class Picky(PrivacyAwareStrategy):
        def select(self, views, eligible, utilities, server_round):
            return super().select(views, eligible, utilities, server_round)

    strategy = _strategy(tmp_path, 5, 2, cls=Picky, strategy={"selection": "random"})
    (record,) = _aggregate_rounds(strategy, 1)
    assert record["sensitivity_clip_multiple"] == 4


def test_privacy_disabled_uses_the_default_delta(tmp_path) -> None:
    strategy = _strategy(
        tmp_path, 3, 2, strategy={"selection": "random"}, privacy={"enabled": False}
    )
    _aggregate_rounds(strategy, 2)
    server_side = strategy.recorder.report.data["privacy"]["server_side"]
    assert server_side["delta"] == 1e-5
    assert "privacy.enabled is false" in server_side["delta_source"]
    assert server_side["epsilon"] == pytest.approx(_pld_epsilon(SIGMA / 2, 2, 1e-5), rel=1e-3)


def test_a_resumed_run_composes_rounds_of_different_noise() -> None:
    config = ServerDpConfig("fixed", noise_multiplier=SIGMA, clip_norm=CLIP)
    full = server_dp_accounting(config, 3, 3)
    swapped = server_dp_accounting(config, 2, 3)
    guarantee = None
    for accounting in (full, full, swapped):
        guarantee = compose_server_side_guarantee(guarantee, accounting, 1e-6, "test")
    assert guarantee is not None
    assert guarantee["rounds"] == 3
    assert guarantee["composition"] == [
        {"effective_noise_multiplier": SIGMA, "rounds": 2},
        {"effective_noise_multiplier": SIGMA / 2, "rounds": 1},
    ]
    accountant = PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4
    )
    accountant.compose(dp_accounting.GaussianDpEvent(SIGMA), 2)
    accountant.compose(dp_accounting.GaussianDpEvent(SIGMA / 2), 1)
    assert guarantee["epsilon"] == pytest.approx(accountant.get_epsilon(1e-6), rel=1e-3)
    assert math.isfinite(guarantee["epsilon"])


@pytest.mark.parametrize(("effective", "rounds"), [(0.375, 4), (0.0625, 100), (0.01, 1000)])
def test_weak_noise_epsilon_is_a_tight_upper_bound(effective: float, rounds: int) -> None:
    """Large ε (weak noise, big k) stays an upper bound within 0.1 %, at any size.

    Checked against the exact hockey-stick δ(ε) of the composed Gaussian (T Gaussians with
    multiplier σ are one with σ/√T), which dp_accounting evaluates in closed form.
    """
    delta = 1e-5
    previous = {"composition": [{"effective_noise_multiplier": effective, "rounds": rounds - 1}]}
    accounting = {
        "effective_noise_multiplier": effective,
        "sensitivity_clip_multiple": 2,
        "noise_multiplier": 2 * effective,
        "selection": "uniform, fixed size",
    }
    guarantee = compose_server_side_guarantee(previous, accounting, delta, "test")
    assert guarantee["rounds"] == rounds
    exact = GaussianPrivacyLoss(effective / math.sqrt(rounds), sensitivity=1.0)
    assert exact.get_delta_for_epsilon(guarantee["epsilon"]) <= delta * (1 + 1e-9)
    assert exact.get_delta_for_epsilon(guarantee["epsilon"] * (1 - 1e-3)) > delta


class _Nodes:
    """The part of Flower's Grid that FedAvg's configure_train reads: the connected nodes."""

    def get_node_ids(self):
        return [1, 2, 3]


def _fedavg_replies(messages, delta: torch.Tensor, weights=(10, 10, 10)):
    """Each node's reply as a ClientApp's: the global arrays plus `delta`, and its weight."""
    replies = []
    for message, weight in zip(messages, weights, strict=True):
        arrays = message.content["arrays"].to_torch_state_dict()
        content = {
            "arrays": ArrayRecord({"w": arrays["w"] + delta}),
            "metrics": MetricRecord({"num-examples": weight}),
        }
        replies.append(Message(RecordDict(content), reply_to=message))
    return replies


def test_the_wrapper_around_flowers_fedavg_clips_noises_and_accounts(monkeypatch) -> None:
    """Flower's plain FedAvg, wrapped: every update clipped to C, σC/m noise on the mean, and
    the round composed into the hospital-level guarantee; unsound uses are refused."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    delta = 1e-5
    dp = HospitalLevelDp(
        ServerDpConfig("fixed", noise_multiplier=SIGMA, clip_norm=CLIP),
        cohort_size=3,
        num_hospitals=3,
        delta=delta,
        delta_source="test",
    )
    fedavg = FedAvg(fraction_evaluate=0.0, min_available_nodes=3)
    wrapped = HospitalLevelDpStrategy(fedavg, dp, data_dependent_selection=False)
    size = 20_000
    direction = torch.zeros(size)
    direction[0] = 1.0
    current = ArrayRecord({"w": torch.zeros(size)})

    messages = list(wrapped.configure_train(1, current, ConfigRecord(), _Nodes()))
    arrays, metrics = wrapped.aggregate_train(1, _fedavg_replies(messages, 40 * CLIP * direction))
    assert metrics is not None
    step = arrays.to_torch_state_dict()["w"].double()
    # clipped: the three identical updates of norm 40C move the model by C along them, not
    # 40C; noised: every other coordinate carries N(0, (σC/m)²)
    stddev = SIGMA * CLIP / 3
    assert float(step[0]) == pytest.approx(CLIP, abs=5 * stddev)
    assert float(step[1:].std()) == pytest.approx(stddev, rel=0.05)
    assert float(step[1:].mean()) == pytest.approx(0.0, abs=5 * stddev / size**0.5)
    assert wrapped.guarantee["rounds"] == 1
    assert wrapped.guarantee["unit"] == "hospital"
    assert wrapped.guarantee["sensitivity_clip_multiple"] == 1
    assert wrapped.guarantee["epsilon"] == pytest.approx(_pld_epsilon(SIGMA, 1, delta), rel=1e-3)

    # a round short of m replies is withheld (FedAvg would divide by 2, not m = 3) ...
    messages = list(wrapped.configure_train(2, arrays, ConfigRecord(), _Nodes()))
    replies = _fedavg_replies(messages, CLIP * direction)
    assert wrapped.aggregate_train(2, replies[:2]) == (None, None)
    assert wrapped.guarantee["rounds"] == 1
    # ... unequal weights are refused, and so are strategies whose aggregate is not a mean
    unequal = _fedavg_replies(messages, CLIP * direction, weights=(10, 10, 30))
    with pytest.raises(ValueError, match="equal, positive 'num-examples'"):
        wrapped.aggregate_train(2, unequal)
    with pytest.raises(ValueError, match="cannot wrap FedAdam"):
        HospitalLevelDpStrategy(FedAdam(), dp)
    assert isinstance(HospitalLevelDpStrategy(FedProx(), dp).strategy, FedProx)
