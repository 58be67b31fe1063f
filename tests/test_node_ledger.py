"""The hospital's persistent ledger: accumulation, the cap, restarts and concurrent charges."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fedllm.privacy import (
    BudgetExceededError,
    GaussianRelease,
    NodePrivacyLedger,
    SampledGaussianSteps,
    compute_epsilon,
    event_to_dict,
)
from fedllm.security.encryption import EncryptionError, IntegrityError, KeyRing

DELTA = 1e-5
ROUND = SampledGaussianSteps(1.0, 0.02, 20)


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def _epsilon_of_rounds(n: int) -> float:
    return compute_epsilon([ROUND] * n, DELTA)


def _run_python(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_charges_accumulate_and_match_compute_epsilon(tmp_path: Path) -> None:
    ledger = NodePrivacyLedger(_url(tmp_path), "st-olav", epsilon_cap=10.0, delta=DELTA)
    assert ledger.spent_epsilon() == 0.0
    first = ledger.charge([ROUND], round_id=1, run_id="run-a")
    release = GaussianRelease(20.0)
    second = ledger.charge([ROUND, release], round_id=2, run_id="run-a")
    assert ledger.events() == [ROUND, ROUND, release]
    assert first == pytest.approx(_epsilon_of_rounds(1), rel=1e-12)
    assert second == pytest.approx(compute_epsilon([ROUND, ROUND, release], DELTA), rel=1e-12)
    assert ledger.spent_epsilon() == second > first > 0
    assert ledger.rounds_participated() == 2
    assert ledger.total_steps() == 2 * ROUND.steps
    ledger.charge([GaussianRelease(50.0)], round_id=3, run_id="run-a")
    assert ledger.rounds_participated() == 2  # a statistic release alone is not a training round
    assert ledger.projected_epsilon([ROUND]) > ledger.spent_epsilon()
    assert ledger.events() == [ROUND, ROUND, release, GaussianRelease(50.0)]


def test_cap_refuses_a_round_and_records_nothing(tmp_path: Path) -> None:
    cap = (_epsilon_of_rounds(1) + _epsilon_of_rounds(2)) / 2
    ledger = NodePrivacyLedger(_url(tmp_path), "haukeland", epsilon_cap=cap, delta=DELTA)
    assert ledger.can_afford([ROUND])
    spent = ledger.charge([ROUND], round_id=1, run_id="run-a")
    assert not ledger.can_afford([ROUND])
    with pytest.raises(BudgetExceededError) as refused:
        ledger.charge([ROUND], round_id=2, run_id="run-a")
    message = str(refused.value)
    assert f"{spent:.6g}" in message
    assert f"{_epsilon_of_rounds(2):.6g}" in message
    assert f"{cap:.6g}" in message
    assert refused.value.projected > refused.value.cap
    assert ledger.events() == [ROUND]
    assert len(ledger.history()) == 1
    assert ledger.spent_epsilon() == spent


def test_state_survives_a_restart_in_another_process(tmp_path: Path) -> None:
    url = _url(tmp_path)
    child = _run_python(
        f"""
        import json
        from fedllm.privacy import NodePrivacyLedger, SampledGaussianSteps
        ledger = NodePrivacyLedger({url!r}, "ahus", epsilon_cap=10.0, delta={DELTA!r})
        for round_id in (1, 2):
            ledger.charge([SampledGaussianSteps(1.0, 0.02, 20)], round_id=round_id, run_id="r1")
        print(json.dumps({{"epsilon": ledger.spent_epsilon()}}))
        """
    )
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    child_epsilon = json.loads(stdout)["epsilon"]

    reopened = NodePrivacyLedger(url, "ahus", epsilon_cap=10.0, delta=DELTA)
    assert reopened.events() == [ROUND, ROUND]
    assert reopened.spent_epsilon() == pytest.approx(child_epsilon, rel=1e-12)
    assert reopened.rounds_participated() == 2
    after = reopened.charge([ROUND], round_id=1, run_id="r2")
    assert after == pytest.approx(_epsilon_of_rounds(3), rel=1e-12)


def test_concurrent_charges_cannot_both_spend_the_last_round(tmp_path: Path) -> None:
    url = _url(tmp_path)
    cap = (_epsilon_of_rounds(2) + _epsilon_of_rounds(3)) / 2
    ledger = NodePrivacyLedger(url, "unn", epsilon_cap=cap, delta=DELTA)
    ledger.charge([ROUND], round_id=1, run_id="r")
    go = tmp_path / "go"
    racers = []
    for name in ("a", "b"):
        ready = tmp_path / f"ready-{name}"
        racers.append(
            _run_python(
                f"""
                import pathlib, time
                from fedllm.privacy import BudgetExceededError, NodePrivacyLedger
                from fedllm.privacy import SampledGaussianSteps
                ledger = NodePrivacyLedger({url!r}, "unn", epsilon_cap={cap!r}, delta={DELTA!r})
                pathlib.Path({str(ready)!r}).touch()
                while not pathlib.Path({str(go)!r}).exists():
                    time.sleep(0.001)
                try:
                    ledger.charge(
                        [SampledGaussianSteps(1.0, 0.02, 20)], round_id=2, run_id={name!r}
                    )
                    print("charged")
                except BudgetExceededError:
                    print("refused")
                """
            )
        )
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{n}").exists() for n in ("a", "b")):
        assert time.monotonic() < deadline, "racers never became ready"
        assert all(r.poll() is None for r in racers), [r.communicate() for r in racers]
        time.sleep(0.01)
    go.touch()
    outcomes = []
    for racer in racers:
        stdout, stderr = racer.communicate(timeout=120)
        assert racer.returncode == 0, stderr
        outcomes.append(stdout.strip())
    assert sorted(outcomes) == ["charged", "refused"]
    assert ledger.events() == [ROUND, ROUND]
    assert ledger.spent_epsilon() <= cap


def test_delta_is_fixed_for_the_life_of_a_dataset(tmp_path: Path) -> None:
    url = _url(tmp_path)
    NodePrivacyLedger(url, "st-olav", epsilon_cap=5.0, delta=DELTA)
    with pytest.raises(ValueError, match="delta"):
        NodePrivacyLedger(url, "st-olav", epsilon_cap=5.0, delta=1e-6)
    other = NodePrivacyLedger(url, "haukeland", epsilon_cap=5.0, delta=1e-6)
    assert other.delta == 1e-6
    raised_cap = NodePrivacyLedger(url, "st-olav", epsilon_cap=8.0, delta=DELTA)
    assert raised_cap.cap == 8.0


def test_hospitals_sharing_a_database_are_accounted_separately(tmp_path: Path) -> None:
    url = _url(tmp_path)
    a = NodePrivacyLedger(url, "a", epsilon_cap=5.0, delta=DELTA)
    b = NodePrivacyLedger(url, "b", epsilon_cap=5.0, delta=DELTA)
    a.charge([ROUND], round_id=1, run_id="r")
    assert b.events() == []
    assert b.spent_epsilon() == 0.0
    assert (a.hospital_id, b.hospital_id, b.accountant) == ("a", "b", "pld")


def test_a_ledger_refuses_an_accountant_that_cannot_bound_replace_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="replace-one"):
        NodePrivacyLedger(_url(tmp_path), "c", epsilon_cap=5.0, delta=DELTA, accountant="rdp")


def test_history_rows(tmp_path: Path) -> None:
    ledger = NodePrivacyLedger(_url(tmp_path), "ous", epsilon_cap=10.0, delta=DELTA)
    before = datetime.now(UTC)
    first = ledger.charge([ROUND], round_id=4, run_id="run-x")
    release = GaussianRelease(30.0, 2)
    second = ledger.charge([ROUND, release], round_id=5, run_id="run-x")
    rows = ledger.history()
    assert [(r["run_id"], r["round_id"]) for r in rows] == [
        ("run-x", 4),
        ("run-x", 5),
        ("run-x", 5),
    ]
    assert [r["event"] for r in rows] == [event_to_dict(e) for e in (ROUND, ROUND, release)]
    assert [r["epsilon_after"] for r in rows] == [first, second, second]
    assert {r["accountant"] for r in rows} == {"pld"}
    times = [datetime.fromisoformat(r["recorded_at"]) for r in rows]
    assert all(t.utcoffset().total_seconds() == 0 for t in times)
    assert before <= times[0] <= times[1] <= datetime.now(UTC)
    json.dumps(rows)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon_cap": 0.0}, "epsilon_cap"),
        ({"delta": 0.0}, "delta"),
        ({"accountant": "gdp"}, "pld, rdp, prv"),
    ],
)
def test_constructor_rejects_bad_settings(tmp_path: Path, kwargs: dict, match: str) -> None:
    settings = {"epsilon_cap": 1.0, "delta": DELTA} | kwargs
    with pytest.raises(ValueError, match=match):
        NodePrivacyLedger(_url(tmp_path), "h", **settings)


def test_charge_rejects_non_events_without_recording(tmp_path: Path) -> None:
    ledger = NodePrivacyLedger(_url(tmp_path), "h", epsilon_cap=10.0, delta=DELTA)
    with pytest.raises(TypeError):
        ledger.charge([ROUND, {"steps": 1}], round_id=1, run_id="r")  # type: ignore[list-item]
    assert ledger.events() == []


def test_ledger_events_are_encrypted_at_rest_and_tampering_is_refused(tmp_path):
    """With a key ring, the event column holds AES-GCM ciphertext, not mechanisms."""
    keyring = KeyRing.generate()
    ledger = NodePrivacyLedger(
        _url(tmp_path), "h1", epsilon_cap=100.0, delta=DELTA, keyring=keyring
    )
    ledger.charge([ROUND, ROUND], round_id=1, run_id="r")
    assert ledger.events() == [ROUND, ROUND]
    assert ledger.spent_epsilon() == pytest.approx(_epsilon_of_rounds(2))
    keyless = NodePrivacyLedger(_url(tmp_path), "h1", epsilon_cap=100.0, delta=DELTA)
    with pytest.raises(EncryptionError, match="no key ring"):
        keyless.spent_epsilon()

    with sqlite3.connect(tmp_path / "ledger.db") as raw:
        stored = [row[0] for row in raw.execute("SELECT event FROM privacy_events ORDER BY id")]
        assert all("noise_multiplier" not in value for value in stored)
        # Change one base64 character of the first row's tag: authentication must fail.
        tampered = stored[0][:-8] + ("A" if stored[0][-8] != "A" else "B") + stored[0][-7:]
        raw.execute("UPDATE privacy_events SET event = ? WHERE id = 1", (tampered,))
    with pytest.raises(IntegrityError):
        ledger.events()
