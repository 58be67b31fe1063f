"""Privacy accounting checked against independent implementations (dp_accounting, opacus)."""

from __future__ import annotations

import itertools
import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import privacy_loss_distribution
from opacus.accountants import PRVAccountant, RDPAccountant
from typer.testing import CliRunner

from fedllm.cli.privacy import privacy_app
from fedllm.privacy import (
    ACCOUNTANTS,
    GaussianRelease,
    SampledGaussianSteps,
    calibrate_noise_multiplier,
    compute_epsilon,
    event_from_dict,
    event_to_dict,
    to_dp_event,
)
from fedllm.privacy.accountant import NEIGHBOURING_RELATIONS
from fedllm.privacy.events import canonical_events

# Every (q, σ, T) corner, σ = 1.1 in the middle only, to keep the PLDs affordable; ε above 100
# (no privacy at all) is left out because it only makes the PLD slow, not more informative.
GRID = [
    (q, sigma, steps)
    for q, sigma, steps in [
        *itertools.product([0.01, 0.1, 1.0], [0.8, 2.0], [1, 100, 1000]),
        *itertools.product([0.01, 0.1, 1.0], [1.1], [100]),
    ]
    if not (q == 1.0 and (steps == 1000 or (steps == 100 and sigma < 1)))
]
DELTAS = (1e-5, 1e-6)
ADD_REMOVE = {"neighbouring": "add-remove"}
RELATIONS = {
    "replace-one": dp_accounting.NeighboringRelation.REPLACE_ONE,
    "add-remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
}


def _reference_pld(
    q: float, sigma: float, steps: int, deltas: tuple[float, ...], relation: str
) -> list[float]:
    """ε straight from dp_accounting's PLD primitives, bypassing our events and accountant."""
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma,
        sampling_prob=q,
        value_discretization_interval=1e-3,
        neighboring_relation=RELATIONS[relation],
    ).self_compose(steps)
    return [pld.get_epsilon_for_delta(d) for d in deltas]


def _opacus(accountant: PRVAccountant | RDPAccountant, q: float, sigma: float, steps: int) -> float:
    accountant.history = [(sigma, q, steps)]
    return float(accountant.get_epsilon(delta=1e-5))


@pytest.mark.parametrize("relation", sorted(RELATIONS))
@pytest.mark.parametrize(("q", "sigma", "steps"), GRID)
def test_pld_matches_dp_accounting_pld(q: float, sigma: float, steps: int, relation: str) -> None:
    event = SampledGaussianSteps(sigma, q, steps)
    ours = [compute_epsilon([event], d, neighbouring=relation) for d in DELTAS]
    reference = _reference_pld(q, sigma, steps, DELTAS, relation)
    for mine, expected in zip(ours, reference, strict=True):
        assert mine == pytest.approx(expected, rel=1e-2)
    assert ours[1] > ours[0]  # smaller δ costs more ε


def test_hospital_epsilon_is_replace_one_and_costs_more_than_add_remove() -> None:
    """Sizes are public, so the default (every hospital's ledger) is replace-one."""
    event = SampledGaussianSteps(1.0, 0.04, 60)
    replace = compute_epsilon([event], 1e-5)
    independent = dp_accounting.pld.PLDAccountant(RELATIONS["replace-one"])
    independent.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.04, dp_accounting.GaussianDpEvent(1.0)), 60
        )
    )
    assert replace == pytest.approx(independent.get_epsilon(1e-5), rel=1e-3)
    assert replace > compute_epsilon([event], 1e-5, **ADD_REMOVE) * 1.1


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_replace_one_needs_pld(accountant: str) -> None:
    with pytest.raises(ValueError, match="replace-one"):
        compute_epsilon([SampledGaussianSteps(1.0, 0.1, 1)], 1e-5, accountant)
    with pytest.raises(ValueError, match="replace-one"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 100, accountant)


@pytest.mark.parametrize(
    ("q", "sigma", "steps"), [(0.01, 0.8, 1000), (0.1, 1.1, 100), (0.05, 1.0, 300), (1.0, 2.0, 10)]
)
def test_tight_accountants_agree_with_opacus(q: float, sigma: float, steps: int) -> None:
    events = [SampledGaussianSteps(sigma, q, steps)]
    pld = compute_epsilon(events, 1e-5, "pld", **ADD_REMOVE)
    opacus_prv = _opacus(PRVAccountant(), q, sigma, steps)
    opacus_rdp = _opacus(RDPAccountant(), q, sigma, steps)
    assert pld == pytest.approx(opacus_prv, rel=0.03)
    assert compute_epsilon(events, 1e-5, "prv", **ADD_REMOVE) == pytest.approx(opacus_prv, rel=1e-6)
    rdp = compute_epsilon(events, 1e-5, "rdp", **ADD_REMOVE)
    assert rdp == pytest.approx(opacus_rdp, rel=0.05)
    assert rdp >= pld


def test_gaussian_release_matches_analytic_gaussian() -> None:
    for sigma, count in [(1.0, 1), (5.0, 4), (20.0, 50)]:
        expected = dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(count), 1e-6)
        release = [GaussianRelease(sigma, count)]
        assert compute_epsilon(release, 1e-6, **ADD_REMOVE) == pytest.approx(expected, rel=1e-2)
        assert compute_epsilon(release, 1e-6, "prv", **ADD_REMOVE) == pytest.approx(
            expected, rel=0.05
        )
        assert compute_epsilon(release, 1e-6, "rdp", **ADD_REMOVE) > expected
        unsampled = [SampledGaussianSteps(sigma, 1.0, count)]
        assert compute_epsilon(unsampled, 1e-6, **ADD_REMOVE) == pytest.approx(expected, rel=1e-2)
        # replace-one: one unit leaves and another enters, sensitivity 2 (σ halved)
        replaced = dp_accounting.get_epsilon_gaussian(sigma / 2 / math.sqrt(count), 1e-6)
        assert compute_epsilon(release, 1e-6) == pytest.approx(replaced, rel=1e-2)


def test_composition_matches_composed_dp_event() -> None:
    a = SampledGaussianSteps(1.1, 0.02, 60)
    b = SampledGaussianSteps(1.5, 0.05, 20)
    c = GaussianRelease(10.0, 3)
    combined = compute_epsilon([a, b, c], 1e-5)
    direct = dp_accounting.pld.PLDAccountant(RELATIONS["replace-one"])
    direct.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1)),
                    60,
                ),
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.5)),
                    20,
                ),
                dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(10.0), 3),
            ]
        )
    )
    assert combined == pytest.approx(direct.get_epsilon(1e-5), rel=1e-3)
    assert combined > max(compute_epsilon([e], 1e-5) for e in (a, b, c))
    assert compute_epsilon([c, b, a], 1e-5) == pytest.approx(combined, rel=1e-9)


def test_splitting_a_schedule_into_rounds_does_not_change_epsilon() -> None:
    rounds = [SampledGaussianSteps(1.0, 0.01, 25)] * 4
    whole = [SampledGaussianSteps(1.0, 0.01, 100)]
    for accountant in ACCOUNTANTS:
        assert compute_epsilon(rounds, 1e-5, accountant, **ADD_REMOVE) == pytest.approx(
            compute_epsilon(whole, 1e-5, accountant, **ADD_REMOVE), rel=1e-9
        )


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_epsilon_is_monotone_in_steps(accountant: str) -> None:
    epsilons = [
        compute_epsilon([SampledGaussianSteps(1.0, 0.01, t)], 1e-5, accountant, **ADD_REMOVE)
        for t in (1, 10, 100, 1000)
    ]
    assert epsilons == sorted(epsilons)
    assert len(set(epsilons)) == len(epsilons)


def test_to_dp_event_structure() -> None:
    built = to_dp_event([SampledGaussianSteps(1.5, 0.1, 7), GaussianRelease(3.0, 2)])
    assert built == dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.5)), 7
            ),
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 2),
        ]
    )


def test_compute_epsilon_edge_cases() -> None:
    assert compute_epsilon([], 1e-5) == 0.0
    with pytest.raises(ValueError, match="pld, rdp, prv"):
        compute_epsilon([SampledGaussianSteps(1.0, 0.1, 1)], 1e-5, "gdp")
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta"):
            compute_epsilon([SampledGaussianSteps(1.0, 0.1, 1)], delta)
    with pytest.raises(TypeError, match="PrivacyEvent"):
        compute_epsilon([(1.0, 0.1, 1)], 1e-5)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("accountant", "target", "q", "steps"),
    [
        ("pld", 1.0, 0.01, 500),
        ("pld", 1.0, 0.05, 100),
        ("rdp", 2.0, 0.01, 1000),
        ("prv", 2.0, 0.05, 20),
    ],
)
def test_calibration_is_tight_and_never_exceeds_target(
    accountant: str, target: float, q: float, steps: int
) -> None:
    relation = {"neighbouring": "replace-one" if accountant == "pld" else "add-remove"}
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, accountant, **relation)
    event = SampledGaussianSteps(sigma, q, steps)
    assert compute_epsilon([event], 1e-5, accountant, **relation) <= target
    less_noise = SampledGaussianSteps(sigma * 0.98, q, steps)
    assert compute_epsilon([less_noise], 1e-5, accountant, **relation) > target


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_calibration_rejects_bad_arguments(kwargs: dict, field: str) -> None:
    arguments = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100}
    with pytest.raises(ValueError, match=field):
        calibrate_noise_multiplier(**(arguments | kwargs))


@pytest.mark.parametrize(
    "event", [SampledGaussianSteps(1.25, 0.004, 321), GaussianRelease(7.5, 2), GaussianRelease(3.0)]
)
def test_event_dict_round_trip(event: SampledGaussianSteps | GaussianRelease) -> None:
    as_dict = event_to_dict(event)
    assert as_dict["kind"] in {"sampled_gaussian_steps", "gaussian_release"}
    assert event_from_dict(json.loads(json.dumps(as_dict))) == event


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: SampledGaussianSteps(0.0, 0.1, 1), "noise_multiplier"),
        (lambda: SampledGaussianSteps(math.nan, 0.1, 1), "noise_multiplier"),
        (lambda: SampledGaussianSteps(1.0, 0.0, 1), "sample_rate"),
        (lambda: SampledGaussianSteps(1.0, 1.5, 1), "sample_rate"),
        (lambda: SampledGaussianSteps(1.0, 0.1, 0), "steps"),
        (lambda: SampledGaussianSteps(1.0, 0.1, 2.5), "steps"),
        (lambda: GaussianRelease(-1.0), "noise_multiplier"),
        (lambda: GaussianRelease(1.0, 0), "count"),
    ],
)
def test_events_validate_parameters(factory, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        factory()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"kind": "laplace", "noise_multiplier": 1.0}, "kind"),
        ({"noise_multiplier": 1.0}, "kind"),
        ({"kind": "sampled_gaussian_steps", "noise_multiplier": 1.0, "steps": 3}, "sample_rate"),
        ({"kind": "gaussian_release", "noise_multiplier": 1.0, "epsilon": 2.0}, "epsilon"),
        ({"kind": "gaussian_release", "noise_multiplier": "1.0"}, "noise_multiplier"),
        (
            {
                "kind": "sampled_gaussian_steps",
                "noise_multiplier": 1.0,
                "sample_rate": 0.1,
                "steps": -2,
            },
            "steps",
        ),
        (["kind", "gaussian_release"], "mapping"),
    ],
)
def test_event_from_dict_names_the_bad_field(data: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        event_from_dict(data)  # type: ignore[arg-type]


def test_gaussian_release_count_defaults_to_one() -> None:
    assert event_from_dict({"kind": "gaussian_release", "noise_multiplier": 2.0}) == (
        GaussianRelease(2.0, 1)
    )


EPSILON_ARGS = ["--noise-multiplier", "1.1", "--sample-rate", "0.01", "--steps", "1000"]


def test_cli_epsilon_json_matches_library() -> None:
    result = CliRunner().invoke(
        privacy_app,
        [
            "epsilon",
            *EPSILON_ARGS,
            "--delta",
            "1e-5",
            "--accountant",
            "rdp",
            "--neighbouring",
            "add-remove",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    event = SampledGaussianSteps(1.1, 0.01, 1000)
    assert payload == {
        "epsilon": compute_epsilon([event], 1e-5, "rdp", **ADD_REMOVE),
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "sample_rate": 0.01,
        "steps": 1000,
        "accountant": "rdp",
        "neighbouring": "add-remove",
    }


def test_cli_epsilon_human_output() -> None:
    result = CliRunner().invoke(privacy_app, ["epsilon", *EPSILON_ARGS, "--delta", "1e-5"])
    assert result.exit_code == 0, result.output
    epsilon = compute_epsilon([SampledGaussianSteps(1.1, 0.01, 1000)], 1e-5)
    assert f"ε = {epsilon:.6g} " in result.stdout
    assert "pld, replace-one" in result.stdout


def test_cli_calibrate_json() -> None:
    args = ["calibrate", "--target-epsilon", "2", "--sample-rate", "0.1", "--steps", "100"]
    result = CliRunner().invoke(
        privacy_app,
        [*args, "--delta", "1e-5", "--accountant", "rdp", "--neighbouring", "add-remove", "--json"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    sigma = payload["noise_multiplier"]
    expected = calibrate_noise_multiplier(2.0, 1e-5, 0.1, 100, "rdp", **ADD_REMOVE)
    assert sigma == pytest.approx(expected, rel=1e-9)
    assert payload["epsilon"] <= 2.0
    event = SampledGaussianSteps(sigma, 0.1, 100)
    achieved = compute_epsilon([event], 1e-5, "rdp", **ADD_REMOVE)
    assert payload["epsilon"] == achieved
    assert payload["accountant"] == "rdp"


GOOD = {"--noise-multiplier": "1", "--sample-rate": "0.1", "--steps": "5", "--delta": "1e-5"}


@pytest.mark.parametrize(
    ("command", "bad", "needle"),
    [
        ("epsilon", {"--noise-multiplier": "0"}, "noise_multiplier"),
        ("epsilon", {"--sample-rate": "1.5"}, "sample_rate"),
        ("epsilon", {"--sample-rate": "0"}, "sample_rate"),
        ("epsilon", {"--steps": "0"}, "steps"),
        ("epsilon", {"--delta": "0"}, "delta"),
        ("epsilon", {"--delta": "1"}, "delta"),
        ("epsilon", {"--accountant": "gdp"}, "pld, rdp, prv"),
        ("epsilon", {"--accountant": "rdp"}, "replace-one"),
        ("epsilon", {"--neighbouring": "swap"}, "replace-one, add-remove"),
        ("calibrate", {"--target-epsilon": "-1"}, "target_epsilon"),
        ("calibrate", {"--delta": "2"}, "delta"),
        ("calibrate", {"--accountant": "gdp"}, "pld, rdp, prv"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(command: str, bad: dict, needle: str) -> None:
    options = GOOD | bad
    if command == "calibrate":
        options = {"--target-epsilon": "1"} | options
        options.pop("--noise-multiplier")
    args = [command, *itertools.chain.from_iterable(options.items())]
    result = CliRunner().invoke(privacy_app, args)
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert "\n" not in message
    assert message.startswith("error:")
    assert needle in message
    assert result.stdout == ""


def test_cli_missing_option_is_a_usage_error() -> None:
    result = CliRunner().invoke(privacy_app, ["epsilon", "--sample-rate", "0.1"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "--noise-multiplier" in result.output


@pytest.mark.parametrize("neighbouring", NEIGHBOURING_RELATIONS)
def test_a_growing_ledger_equals_a_fresh_pld_accountant_exactly(neighbouring: str) -> None:
    """Each charge composes a new total of the same steps; the cached step PLD changes nothing.

    Round by round, as a hospital's ledger grows (DP-SGD steps, a statistics release), ε from
    compute_epsilon, whose PLD accountant reuses the step's PLD across calls, is bit-for-bit
    the ε of a fresh dp_accounting PLDAccountant given the same canonical events.
    """
    round_events = [SampledGaussianSteps(1.1, 0.04, 5), GaussianRelease(8.0, 1)]
    recorded: list = []
    for _ in range(4):
        recorded += round_events
        ours = compute_epsilon(recorded, 1e-5, neighbouring=neighbouring)
        fresh = dp_accounting.pld.PLDAccountant(RELATIONS[neighbouring])
        fresh.compose(to_dp_event(canonical_events(recorded)))
        assert ours == fresh.get_epsilon(1e-5)
    # the same step PLD again, for a different number of steps and at another δ
    again = [SampledGaussianSteps(1.1, 0.04, 3)]
    fresh = dp_accounting.pld.PLDAccountant(RELATIONS[neighbouring])
    fresh.compose(to_dp_event(canonical_events(again)))
    assert compute_epsilon(again, 1e-6, neighbouring=neighbouring) == fresh.get_epsilon(1e-6)
