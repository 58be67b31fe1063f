"""Cohort selection: the QUBO, the exact reference, every solver's guarantees, and the CLI."""

from __future__ import annotations

import itertools
import json

import dimod
import numpy as np
import pytest
import scipy.sparse as sp
import typer
from typer.testing import CliRunner

from fedllm.cli.app import app as fedllm_app
from fedllm.selection import (
    ALL_SOLVERS,
    DEFAULT_SOLVER,
    CohortInstance,
    InstanceError,
    add_cardinality_penalty,
    build_cohort_bqm,
    cohort_objective,
    dominance_mask,
    instance_from_dict,
    instance_to_dict,
    load_instance,
    penalty_strength,
    solve,
    solve_exact,
    swap_descent,
    synthetic_instance,
)
from fedllm.selection.qubo import swap_neighbours

SOLVERS = (*ALL_SOLVERS, "dimod:dwave.samplers.SteepestDescentSolver")
ANNEALERS = ("sqa-swap", "sa-swap")


def brute_force(instance: CohortInstance) -> tuple[float, tuple[int, ...]]:
    """Best objective and cohort by enumerating every eligible K-subset."""
    best = (-np.inf, ())
    for cohort in itertools.combinations(instance.eligible_indices.tolist(), instance.k):
        value = cohort_objective(instance.utility, instance.similarity, instance.lam, cohort)
        best = max(best, (value, cohort))
    return best


def random_instance(rng: np.random.Generator, n: int, k: int) -> CohortInstance:
    """Unstructured instances (no clusters): dense or sparse, some hospitals ineligible."""
    utility = rng.lognormal(0.0, rng.uniform(0.1, 1.0), size=n)
    similarity = np.triu(rng.random((n, n)) * (rng.random((n, n)) < rng.uniform(0.2, 1.0)), 1)
    similarity = similarity + similarity.T
    eligible = rng.random(n) > 0.25
    eligible[rng.choice(n, k, replace=False)] = True
    lam = rng.uniform(0.0, 3.0) * utility.mean() / max(similarity.mean() * k, 1e-9)
    matrix = sp.csr_array(similarity) if rng.random() < 0.5 else similarity
    return CohortInstance(utility, matrix, k, lam, eligible)


@pytest.fixture(scope="module")
def mid_instance() -> CohortInstance:
    """Big enough that annealers really anneal (not the small-instance exact shortcut)."""
    return synthetic_instance(36, 7, seed=5, ineligible_share=0.3, spread=0.2, tilt=1.0)


@pytest.fixture(scope="module")
def results(mid_instance: CohortInstance) -> dict[str, object]:
    """One result per solver on the shared instance (solving once keeps the file fast)."""
    return {
        name: solve(mid_instance, name, seed=3, small_exact=False)
        if name in ANNEALERS
        else solve(mid_instance, name, seed=3)
        for name in SOLVERS
    }


# ---------------------------------------------------------------- the model


def test_bqm_energy_is_minus_objective_and_ineligible_removed() -> None:
    rng = np.random.default_rng(0)
    instance = random_instance(rng, 10, 4)
    bqm = build_cohort_bqm(
        instance.utility, instance.similarity, instance.k, instance.lam, instance.eligible
    )
    assert set(bqm.variables) == set(instance.eligible_indices.tolist())
    for _ in range(20):
        cohort = rng.choice(instance.eligible_indices, instance.k, replace=False)
        sample = {v: int(v in cohort) for v in bqm.variables}
        expected = cohort_objective(instance.utility, instance.similarity, instance.lam, cohort)
        assert bqm.energy(sample) == pytest.approx(-expected)


def test_penalised_ground_state_is_the_optimal_cohort() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        instance = random_instance(rng, 9, 3)
        bqm = add_cardinality_penalty(
            build_cohort_bqm(
                instance.utility, instance.similarity, 3, instance.lam, instance.eligible
            ),
            instance.k,
            penalty_strength(instance),
        )
        ground = dimod.ExactSolver().sample(bqm).first
        chosen = [v for v, bit in ground.sample.items() if bit]
        assert len(chosen) == instance.k
        assert -ground.energy == pytest.approx(brute_force(instance)[0])


def test_exact_matches_brute_force_on_many_small_instances() -> None:
    rng = np.random.default_rng(2)
    for _ in range(40):
        n = int(rng.integers(5, 13))
        instance = random_instance(rng, n, int(rng.integers(1, min(6, n) + 1)))
        best, cohort = brute_force(instance)
        selected = solve_exact(instance)
        value = cohort_objective(instance.utility, instance.similarity, instance.lam, selected)
        assert value == pytest.approx(best, abs=1e-9)
        assert dominance_mask(instance)[list(cohort)].all()


def test_default_solver_matches_exact_on_small_instances() -> None:
    rng = np.random.default_rng(3)
    hits = trials = 0
    for n in range(15, 26):
        for seed in range(4):
            family = {"spread": rng.uniform(0.1, 0.6), "tilt": rng.uniform(0.0, 2.0)}
            instance = synthetic_instance(n, max(2, n // 5), seed=100 * n + seed, **family)
            optimum = cohort_objective(
                instance.utility, instance.similarity, instance.lam, solve_exact(instance)
            )
            result = solve(instance, DEFAULT_SOLVER, seed=seed, small_exact=False)
            hits += result.objective >= optimum - 1e-9 * max(1.0, abs(optimum))
            trials += 1
    assert hits / trials >= 0.95


def test_default_solver_uses_exact_for_tiny_instances_and_says_so() -> None:
    result = solve(synthetic_instance(12, 3, seed=0))
    assert result.solver == f"{DEFAULT_SOLVER}/exact"


def test_swap_neighbours_objectives_are_exact(mid_instance: CohortInstance) -> None:
    cohort = np.zeros(mid_instance.n, dtype=bool)
    cohort[solve_exact(mid_instance)] = True
    states, values = swap_neighbours(mid_instance, cohort, 30)
    assert states.shape == (30, mid_instance.n)
    assert np.all(values <= values[0] + 1e-12)
    for state, value in zip(states, values, strict=True):
        assert state.sum() == mid_instance.k
        recomputed = cohort_objective(
            mid_instance.utility, mid_instance.similarity, mid_instance.lam, np.flatnonzero(state)
        )
        assert value == pytest.approx(recomputed)


def test_swap_descent_reaches_a_swap_local_optimum(mid_instance: CohortInstance) -> None:
    rng = np.random.default_rng(4)
    start = np.zeros((3, mid_instance.n), dtype=bool)
    for row in start:
        row[rng.choice(mid_instance.eligible_indices, mid_instance.k, replace=False)] = True
    for state in swap_descent(mid_instance, start):
        _, values = swap_neighbours(mid_instance, state, 1)
        here = cohort_objective(
            mid_instance.utility, mid_instance.similarity, mid_instance.lam, np.flatnonzero(state)
        )
        assert values[0] <= here + 1e-9


def test_sparse_and_dense_similarity_give_the_same_answer() -> None:
    dense = synthetic_instance(60, 12, seed=7)
    sparse = CohortInstance(
        dense.utility, sp.csr_array(dense.similarity), dense.k, dense.lam, dense.eligible
    )
    assert solve(dense, seed=1).selected == solve(sparse, seed=1).selected
    assert solve_exact(dense).tolist() == solve_exact(sparse).tolist()


def test_large_sparse_instance_is_solved_quickly() -> None:
    instance = synthetic_instance(3000, 30, seed=1, neighbours=12)
    result = solve(instance, seed=0)
    greedy = solve(instance, "greedy")
    assert len(result.selected) == 30
    assert result.objective >= greedy.objective - 1e-9
    assert result.seconds < 10


# ---------------------------------------------------------------- every solver


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_returns_feasible_eligible_cohort(name, results, mid_instance) -> None:
    result = results[name]
    assert len(result.selected) == mid_instance.k == len(set(result.selected))
    assert list(result.selected) == sorted(result.selected)
    assert mid_instance.eligible[list(result.selected)].all()
    for cohort, _ in result.samples:
        assert len(cohort) == mid_instance.k
        assert mid_instance.eligible[list(cohort)].all()


@pytest.mark.parametrize("name", SOLVERS)
def test_reported_objectives_are_recomputed_exactly(name, results, mid_instance) -> None:
    result = results[name]
    args = (mid_instance.utility, mid_instance.similarity, mid_instance.lam)
    assert result.objective == pytest.approx(cohort_objective(*args, result.selected))
    for cohort, value in result.samples:
        assert value == pytest.approx(cohort_objective(*args, cohort))


@pytest.mark.parametrize("name", SOLVERS)
def test_inclusion_probabilities_are_a_distribution(name, results, mid_instance) -> None:
    result = results[name]
    probabilities = result.inclusion_probabilities
    assert probabilities.shape == (mid_instance.n,)
    assert np.all((probabilities >= 0) & (probabilities <= 1 + 1e-12))
    assert probabilities.sum() == pytest.approx(mid_instance.k)
    assert np.all(probabilities[~mid_instance.eligible] == 0)
    assert result.sample_weights.sum() == pytest.approx(1.0)
    assert len(result.samples) == len(result.sample_weights)


@pytest.mark.parametrize("name", SOLVERS)
def test_same_seed_same_result(name, results, mid_instance) -> None:
    options = {"small_exact": False} if name in ANNEALERS else {}
    again = solve(mid_instance, name, seed=3, **options)
    assert again.selected == results[name].selected
    assert again.samples == results[name].samples
    np.testing.assert_array_equal(
        again.inclusion_probabilities, results[name].inclusion_probabilities
    )


def test_annealers_match_exact_and_beat_baselines(results) -> None:
    optimum = results["exact"].objective
    for name in ANNEALERS:
        assert results[name].objective == pytest.approx(optimum)
    assert results["random"].objective <= optimum


def test_draw_follows_the_ensemble(results) -> None:
    result = results[DEFAULT_SOLVER]
    rng = np.random.default_rng(0)
    counts = np.zeros(result.inclusion_probabilities.size)
    for _ in range(2000):
        counts[list(result.draw(rng))] += 1
    np.testing.assert_allclose(counts / 2000, result.inclusion_probabilities, atol=0.05)


def test_unknown_solver_lists_valid_names(mid_instance) -> None:
    with pytest.raises(InstanceError, match="valid: sqa-swap, sa-swap, exact"):
        solve(mid_instance, "quantum-magic")
    with pytest.raises(InstanceError, match="cannot load dimod sampler"):
        solve(mid_instance, "dimod:nowhere.Sampler")


# ---------------------------------------------------------------- validation


def valid_document() -> dict:
    return {
        "k": 2,
        "lambda": 0.5,
        "utility": [1.0, 2.0, 3.0],
        "similarity": [[0, 0.1, 0.2], [0.1, 0, 0.3], [0.2, 0.3, 0]],
        "eligible": [True, True, False],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"similarity": [[0, 1], [1, 0]]}, "similarity is 2×2 but utility has 3"),
        ({"similarity": [[0, 1, 2], [1, 0, 3]]}, "square"),
        ({"similarity": [[0, 0.1, 0.2], [0.9, 0, 0.3], [0.2, 0.3, 0]]}, "symmetric"),
        ({"similarity": [[1, 0.1, 0.2], [0.1, 0, 0.3], [0.2, 0.3, 0]]}, "zero diagonal"),
        ({"similarity": [[0, -1, 0.2], [-1, 0, 0.3], [0.2, 0.3, 0]]}, ">= 0"),
        ({"utility": [1.0, float("nan"), 3.0]}, "NaN"),
        ({"similarity": [[0, float("nan"), 0], [float("nan"), 0, 0], [0, 0, 0]]}, "NaN"),
        ({"k": 3}, "only 2 of 3 hospitals are eligible"),
        ({"k": 0}, "at least 1"),
        ({"k": 1.5}, "integer"),
        ({"lambda": -1}, "lambda"),
        ({"eligible": [True, False]}, "eligible has length 2, expected 3"),
        ({"eligible": [1, 0, 1]}, "true/false"),
        ({"utility": ["a", 1, 2]}, "numbers"),
        ({"extra": 1}, "unknown key"),
    ],
)
def test_instance_validation_errors(change, message) -> None:
    document = {**valid_document(), **change}
    with pytest.raises(InstanceError, match=message):
        instance_from_dict(document)


def test_missing_keys_and_non_objects_are_rejected() -> None:
    with pytest.raises(InstanceError, match="missing required key"):
        instance_from_dict({"k": 1})
    with pytest.raises(InstanceError, match="JSON object"):
        instance_from_dict([1, 2])


def test_instance_round_trips_through_json(tmp_path) -> None:
    instance = synthetic_instance(15, 3, seed=2, ineligible_share=0.3)
    path = tmp_path / "instance.json"
    path.write_text(json.dumps(instance_to_dict(instance)))
    loaded = load_instance(path)
    np.testing.assert_array_equal(loaded.eligible, instance.eligible)
    np.testing.assert_allclose(loaded.similarity, instance.similarity)
    assert (loaded.k, loaded.lam) == (instance.k, instance.lam)


# ---------------------------------------------------------------- the CLI


@pytest.fixture
def cli() -> typer.Typer:
    """The real ``fedllm`` app: ``select`` is imported when it is invoked."""
    return fedllm_app


def test_cli_json_output(cli, tmp_path) -> None:
    path = tmp_path / "instance.json"
    path.write_text(json.dumps(valid_document()))
    outcome = CliRunner().invoke(cli, ["select", str(path), "--json", "--seed", "1"])
    assert outcome.exit_code == 0, outcome.output
    payload = json.loads(outcome.stdout)
    assert {"selected", "objective", "solver", "seconds", "inclusion_probabilities"} <= set(payload)
    assert payload["selected"] == [0, 1]
    assert payload["objective"] == pytest.approx(3.0 - 0.5 * 0.1)
    assert sum(payload["inclusion_probabilities"]) == pytest.approx(2.0)


def test_cli_rich_output(cli, tmp_path) -> None:
    path = tmp_path / "instance.json"
    path.write_text(json.dumps(valid_document()))
    outcome = CliRunner().invoke(cli, ["select", str(path), "--solver", "greedy"])
    assert outcome.exit_code == 0, outcome.output
    assert "objective" in outcome.stdout


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, [], "cannot read instance file"),
        ("{not json", [], "not valid JSON"),
        (json.dumps({**valid_document(), "k": 5}), [], "eligible"),
        (json.dumps(valid_document()), ["--solver", "nope"], "unknown solver"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_error(cli, tmp_path, content, args, message):
    path = tmp_path / "instance.json"
    if content is not None:
        path.write_text(content)
    outcome = CliRunner().invoke(cli, ["select", str(path), "--json", *args])
    assert outcome.exit_code == 2
    assert isinstance(outcome.exception, SystemExit)
    assert outcome.stderr.startswith("error: ")
    assert message in outcome.stderr
    assert "Traceback" not in outcome.output
