"""How a run ended: a sweep must be able to trust the status and the exit code."""

from __future__ import annotations

from fedllm.report.outcome import run_outcome


def _row(number: int, *, skipped: bool = False, failed=(), lost=()) -> dict:
    return {"round": number, "skipped": skipped, "failed": list(failed), "lost": list(lost)}


def test_every_round_trained_and_nobody_failed_is_completed():
    outcome = run_outcome([_row(1), _row(2)], [], rounds_requested=2)
    assert (outcome.status, outcome.summary, outcome.causes) == ("completed", None, [])


def test_a_run_that_trained_nothing_failed():
    causes = ["hospital a: DataError: no records", "hospital b: DataError: no records"]
    outcome = run_outcome([_row(1, skipped=True)], causes, rounds_requested=1)
    assert outcome.status == "failed"
    assert outcome.summary == "no round trained anything"
    assert outcome.causes == causes
    assert run_outcome([], causes, rounds_requested=3).status == "failed"


def test_a_failed_or_lost_hospital_or_an_empty_round_degrades_the_run():
    lost = run_outcome([_row(1, lost=["c"]), _row(2)], ["hospital c: lost"], 2)
    assert (lost.status, lost.causes) == ("degraded", ["hospital c: lost"])
    empty = run_outcome([_row(1), _row(2, skipped=True)], [], 2)
    assert empty.status == "degraded"
    assert "round(s) 2 trained nothing" in empty.summary
    refused = run_outcome([_row(1)], ["hospital d: DataError: x", "hospital d: DataError: x"], 1)
    assert refused.causes == ["hospital d: DataError: x"]  # one line per cause


def test_a_resumed_run_with_nothing_left_to_do_is_judged_by_its_rounds():
    assert run_outcome([_row(1), _row(2)], [], rounds_requested=0).status == "completed"
