"""The server's ledger: rounds, mirrored events, ε derivation, restarts and atomic rounds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fedllm.privacy import GaussianRelease, SampledGaussianSteps, compute_epsilon, event_to_dict
from fedllm.privacy.server_ledger import ResumeState, ServerLedger

DELTA = 1e-5
CONFIG = json.dumps({"rounds": 5, "cohort": 2, "sigma": 1.0})
TRAIN = SampledGaussianSteps(1.0, 0.02, 20)
STATS = GaussianRelease(10.0)


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'server.db'}"


def _round(round_id: int, checkpoint: str | None = None) -> dict[str, Any]:
    """A round in which a and b train, c only reports statistics and d is ineligible."""
    return {
        "cohort": ["b", "a"],
        "utilities": {"a": 0.5, "b": 1.25, "c": -0.75},
        "inclusion_probabilities": {"a": 0.6, "b": 0.9, "c": 0.5, "d": 0.0},
        "ineligible": {"d": "budget: projected ε 8.1 > cap 8.0"},
        "hospital_events": {
            "a": [event_to_dict(TRAIN), event_to_dict(STATS)],
            "b": [event_to_dict(TRAIN)],
            "c": [event_to_dict(STATS)],
        },
        "reported_epsilon": {"a": 0.1 * round_id, "b": 0.2 * round_id},
        "checkpoint": checkpoint,
    }


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_record_and_read_rounds(tmp_path: Path) -> None:
    ledger = ServerLedger(_url(tmp_path))
    ledger.start_run("run-1", CONFIG)
    assert ledger.last_completed_round("run-1") == 0
    assert ledger.rounds("run-1") == []
    ledger.record_round("run-1", 1, **_round(1, "ckpt/round-1.pt"))
    ledger.record_round("run-1", 3, **_round(3))  # gaps allowed; no checkpoint this round

    rounds = ledger.rounds("run-1")
    assert [r["round_id"] for r in rounds] == [1, 3]
    first = rounds[0]
    expected = _round(1, "ckpt/round-1.pt")
    assert first["cohort"] == ["b", "a"]  # selection order survives
    for key in ("utilities", "inclusion_probabilities", "ineligible", "reported_epsilon"):
        assert first[key] == expected[key], key
    assert first["hospital_events"] == expected["hospital_events"]
    assert first["checkpoint"] == "ckpt/round-1.pt"
    assert first["recorded_at"].endswith("+00:00")
    assert rounds[1]["checkpoint"] is None
    assert ledger.last_completed_round("run-1") == 3
    assert ledger.checkpoint("run-1") == "ckpt/round-1.pt"  # None keeps the last one
    assert ledger.resume_state("run-1") == ResumeState("run-1", CONFIG, 3, "ckpt/round-1.pt")
    assert ledger.resume_state("never") is None
    assert ledger.last_completed_round("never") == 0


def test_epsilon_is_derived_from_mirrored_events(tmp_path: Path) -> None:
    ledger = ServerLedger(_url(tmp_path))
    for run in ("run-1", "run-2"):
        ledger.start_run(run, CONFIG)
    ledger.record_round("run-1", 1, **_round(1))
    ledger.record_round("run-1", 2, **_round(2))
    ledger.record_round("run-2", 1, **_round(1))

    assert ledger.hospital_events("run-1", "a") == [TRAIN, STATS, TRAIN, STATS]
    assert ledger.hospital_events(None, "a") == [TRAIN, STATS] * 3
    assert ledger.hospital_events(None, "c") == [STATS] * 3
    assert ledger.hospital_events(None, "d") == []

    lifetime = [TRAIN, STATS] * 3
    spent = ledger.spent_epsilon("a", DELTA)
    assert spent == pytest.approx(compute_epsilon(lifetime, DELTA), rel=1e-12)
    assert spent > 0.6  # far from any reported ε: reports are never the source
    with pytest.raises(ValueError, match="replace-one"):
        ledger.spent_epsilon("a", DELTA, accountant="rdp")
    assert ledger.spent_epsilon("d", DELTA) == 0.0
    projected = ledger.projected_epsilon("b", [TRAIN], DELTA)
    assert projected == pytest.approx(compute_epsilon([TRAIN] * 4, DELTA), rel=1e-12)
    assert projected > ledger.spent_epsilon("b", DELTA)


def test_state_survives_restart_in_new_object_and_process(tmp_path: Path) -> None:
    url = _url(tmp_path)
    ledger = ServerLedger(url)
    ledger.start_run("run-1", CONFIG)
    ledger.record_round("run-1", 1, **_round(1, "ckpt/1.pt"))
    ledger.record_round("run-1", 2, **_round(2, "ckpt/2.pt"))
    spent = ledger.spent_epsilon("a", DELTA)

    reopened = ServerLedger(url)
    assert reopened.last_completed_round("run-1") == 2
    assert reopened.rounds("run-1") == ledger.rounds("run-1")
    reopened.start_run("run-1", CONFIG)  # a restarted server re-registers: a no-op

    child = _run_python(
        f"""
        import json
        from fedllm.privacy.server_ledger import ServerLedger
        ledger = ServerLedger({url!r})
        state = ledger.resume_state("run-1")
        print(json.dumps({{
            "round": ledger.last_completed_round("run-1"),
            "checkpoint": state.checkpoint,
            "config": state.config_json,
            "epsilon": ledger.spent_epsilon("a", {DELTA!r}),
            "cohorts": [r["cohort"] for r in ledger.rounds("run-1")],
        }}))
        """
    )
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    assert seen["round"] == 2
    assert seen["checkpoint"] == "ckpt/2.pt"
    assert seen["config"] == CONFIG
    assert seen["epsilon"] == pytest.approx(spent, rel=1e-12)
    assert seen["cohorts"] == [["b", "a"], ["b", "a"]]


def test_invalid_event_at_the_end_writes_nothing(tmp_path: Path) -> None:
    ledger = ServerLedger(_url(tmp_path))
    ledger.start_run("run-1", CONFIG)
    ledger.record_round("run-1", 1, **_round(1, "ckpt/1.pt"))
    before = ledger.rounds("run-1")
    broken = _round(2, "ckpt/2.pt")
    broken["hospital_events"]["z"] = [event_to_dict(TRAIN), {"kind": "laplace", "scale": 1.0}]
    with pytest.raises(ValueError, match="kind"):
        ledger.record_round("run-1", 2, **broken)
    assert ledger.rounds("run-1") == before
    assert ledger.last_completed_round("run-1") == 1
    assert ledger.checkpoint("run-1") == "ckpt/1.pt"
    assert ledger.hospital_events(None, "a") == [TRAIN, STATS]
    assert ledger.hospital_events(None, "z") == []
    ledger.record_round("run-1", 2, **_round(2))  # the round can then be recorded properly
    assert ledger.last_completed_round("run-1") == 2


def test_crash_during_the_write_leaves_the_previous_round(tmp_path: Path) -> None:
    """Kill the writing process once round 2's event rows reach the database, before COMMIT."""
    url = _url(tmp_path)
    ledger = ServerLedger(url)
    ledger.start_run("run-1", CONFIG)
    ledger.record_round("run-1", 1, **_round(1, "ckpt/1.pt"))
    before = ledger.rounds("run-1")

    child = _run_python(
        f"""
        import os
        from sqlalchemy import Engine, event
        from fedllm.privacy.server_ledger import ServerLedger

        def crash_after_events(conn, cursor, statement, parameters, context, executemany):
            if statement.startswith("INSERT INTO server_privacy_events"):
                os._exit(17)

        round_2 = {_round(2, "ckpt/2.pt")!r}
        ledger = ServerLedger({url!r})
        event.listen(Engine, "after_cursor_execute", crash_after_events)
        ledger.record_round("run-1", 2, **round_2)
        """
    )
    assert child.returncode == 17, child.stderr

    reopened = ServerLedger(url)
    assert reopened.rounds("run-1") == before
    assert reopened.last_completed_round("run-1") == 1
    assert reopened.checkpoint("run-1") == "ckpt/1.pt"
    assert reopened.hospital_events("run-1", "b") == [TRAIN]
    reopened.record_round("run-1", 2, **_round(2, "ckpt/2.pt"))
    assert reopened.last_completed_round("run-1") == 2


def test_start_run_rejects_a_different_config(tmp_path: Path) -> None:
    ledger = ServerLedger(_url(tmp_path))
    ledger.start_run("run-1", CONFIG)
    ledger.start_run("run-1", '{"sigma": 1.0, "cohort": 2, "rounds": 5}')  # same JSON
    with pytest.raises(ValueError, match="different configuration"):
        ledger.start_run("run-1", json.dumps({"rounds": 5, "cohort": 3, "sigma": 1.0}))
    with pytest.raises(ValueError, match="JSON"):
        ledger.start_run("run-2", "{not json")
    assert ledger.resume_state("run-1").config_json == CONFIG


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cohort": ["a", "a"]}, "twice"),
        ({"cohort": ["a", "d"]}, "selected and ineligible"),
        ({"inclusion_probabilities": {"a": 1.5}}, "inclusion probability"),
        ({"inclusion_probabilities": {"a": 0.0}}, "probability 0"),
        ({"reported_epsilon": {"a": -1.0}}, "reported ε"),
        ({"utilities": {"a": float("nan")}}, "utility"),
    ],
)
def test_record_round_rejects_inconsistent_rounds(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    ledger = ServerLedger(_url(tmp_path))
    ledger.start_run("run-1", CONFIG)
    with pytest.raises(ValueError, match=message):
        ledger.record_round("run-1", 1, **{**_round(1), **change})
    assert ledger.rounds("run-1") == []


def test_record_round_requires_a_started_run_and_increasing_rounds(tmp_path: Path) -> None:
    ledger = ServerLedger(_url(tmp_path))
    with pytest.raises(ValueError, match="start_run"):
        ledger.record_round("run-1", 1, **_round(1))
    ledger.start_run("run-1", CONFIG)
    ledger.record_round("run-1", 2, **_round(2))
    for stale in (1, 2):
        with pytest.raises(ValueError, match="not after the last completed round 2"):
            ledger.record_round("run-1", stale, **_round(stale))
    with pytest.raises(ValueError, match="round_id"):
        ledger.record_round("run-1", 0, **_round(0))
    assert len(ledger.rounds("run-1")) == 1
