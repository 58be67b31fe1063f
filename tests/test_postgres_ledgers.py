"""The server-side ledger and the budget ledger on a real PostgreSQL server.

A consortium running several experiments at once points every federation server at one
database; each run's rounds must stay whole and in order, and every hospital's lifetime ε must
count every run's events. The budget ledger's reserve/commit must hold across connections.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from fedllm.privacy import SampledGaussianSteps, compute_epsilon, event_to_dict
from fedllm.privacy.server_ledger import ServerLedger
from fedllm.serving.router.budgets import BudgetLedger, QuotaExceededError

pytest_plugins = ["postgres_server"]

DELTA = 1e-5
TRAIN = SampledGaussianSteps(1.0, 0.02, 20)
RUNS = 4
ROUNDS = 5


def _round() -> dict:
    return {
        "cohort": ["a", "b"],
        "utilities": {"a": 0.5, "b": 1.0},
        "inclusion_probabilities": {"a": 1.0, "b": 1.0},
        "ineligible": {},
        "hospital_events": {"a": [event_to_dict(TRAIN)], "b": [event_to_dict(TRAIN)]},
        "reported_epsilon": {"a": 0.1, "b": 0.1},
        "checkpoint": None,
    }


def test_server_ledger_runs_several_experiments_at_once(postgres_url):
    start = threading.Barrier(RUNS, timeout=30)

    def experiment(index: int) -> None:
        ledger = ServerLedger(postgres_url)  # one per federation server, as in production
        run_id = f"exp-{index}"
        start.wait()
        ledger.start_run(run_id, json.dumps({"run": index}))
        ledger.start_run(run_id, json.dumps({"run": index}))  # a restarted server
        for round_id in range(1, ROUNDS + 1):
            ledger.record_round(
                run_id,
                round_id,
                checkpoint=f"{run_id}/r{round_id}",
                **{key: value for key, value in _round().items() if key != "checkpoint"},
            )

    with ThreadPoolExecutor(RUNS) as pool:
        list(pool.map(experiment, range(RUNS)))
    ledger = ServerLedger(postgres_url)
    for index in range(RUNS):
        run_id = f"exp-{index}"
        rounds = ledger.rounds(run_id)
        assert [r["round_id"] for r in rounds] == list(range(1, ROUNDS + 1))
        assert rounds[0]["cohort"] == ["a", "b"]
        assert rounds[0]["recorded_at"].endswith("+00:00")
        assert ledger.resume_state(run_id).checkpoint == f"{run_id}/r{ROUNDS}"
        assert len(ledger.hospital_events(run_id, "a")) == ROUNDS
    lifetime = compute_epsilon([TRAIN] * (RUNS * ROUNDS), DELTA)
    assert ledger.spent_epsilon("a", DELTA) == pytest.approx(lifetime)
    with pytest.raises(ValueError, match="different configuration"):
        ledger.start_run("exp-0", json.dumps({"run": "other"}))
    with pytest.raises(ValueError, match="not after the last completed round"):
        ledger.record_round("exp-1", ROUNDS, **_round())


def test_first_start_of_one_run_from_two_servers_at_once(postgres_url):
    """Two servers registering the same new run race on its insert: both must succeed."""
    ledgers = [ServerLedger(postgres_url) for _ in range(8)]
    start = threading.Barrier(len(ledgers), timeout=30)

    def register(ledger: ServerLedger) -> None:
        start.wait()
        ledger.start_run("shared", json.dumps({"run": "shared"}))

    with ThreadPoolExecutor(len(ledgers)) as pool:
        list(pool.map(register, ledgers))
    assert ledgers[0].last_completed_round("shared") == 0


def test_budget_reservations_never_overspend_across_connections(postgres_url):
    """50 threads, each with its own ledger object (own pool), race for a quota of ten."""
    ledgers = [
        BudgetLedger(postgres_url, user_quota=1.0, department_quota=100.0, period_s=3600)
        for _ in range(5)
    ]
    start = threading.Barrier(50, timeout=30)

    def attempt(index: int) -> bool:
        ledger = ledgers[index % len(ledgers)]
        start.wait()
        try:
            reservation = ledger.reserve("ann", "icu", 0.1)
        except QuotaExceededError:
            return False
        ledger.commit(reservation)
        return True

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(attempt, range(50)))
    assert outcomes.count(True) == 10
    status = ledgers[0].status("ann", "icu")
    assert status.spent == pytest.approx(1.0)
    assert status.reserved == 0.0
    assert ledgers[0].status("bob", "icu").department_remaining == pytest.approx(99.0)
