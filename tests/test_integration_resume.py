"""A run interrupted part-way resumes from the server ledger without repeating finished rounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from federation_helpers import TINY_TEST_MODEL, flower_processes, run_cli

from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.privacy.server_ledger import ServerLedger

pytestmark = pytest.mark.integration

CONFIG = {
    "run": {"name": "resumable", "seed": 2, "rounds": 6},
    "federation": {
        "num_hospitals": 2,
        "cohort_size": 2,
        "hospitals": [
            {"name": "east", "data_size": 60, "specialty_mix": {"neurology": 1.0}},
            {"name": "west", "data_size": 60, "specialty_mix": {"pediatrics": 1.0}},
        ],
    },
    "model": TINY_TEST_MODEL,
    "training": {"local_steps": 2, "batch_size": 8, "learning_rate": 0.01},
    "privacy": {"target_epsilon": None, "noise_multiplier": 1.0, "epsilon_cap": 100.0},
    "evaluation": {"baselines": [], "max_eval_sequences": 16},
}


def _rounds(report_path) -> list[int]:
    try:
        return [row["round"] for row in json.loads(report_path.read_text())["rounds"]]
    except (OSError, ValueError):
        return []


def test_interrupted_run_resumes_from_the_ledger(tmp_path):
    config = {**CONFIG, "run": {**CONFIG["run"], "output_dir": str(tmp_path / "runs")}}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "runs" / "resumable"
    process = subprocess.Popen(
        [sys.executable, "-m", "fedllm.cli", "run", str(tmp_path / "x.yaml"), "--json"],
        env=dict(os.environ, FEDLLM_CACHE_DIR=str(tmp_path / "cache")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 400
    while not _rounds(run_dir / "report.json") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _rounds(run_dir / "report.json"), "the first round never finished"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "fedllm resume" in stderr
    assert flower_processes(tmp_path) == set()
    interrupted_at = ServerLedger(f"sqlite:///{run_dir / 'server.db'}").last_completed_round(
        "resumable"
    )
    assert 1 <= interrupted_at < 6

    result = run_cli(tmp_path, "resume", str(run_dir), "--json", "--no-baselines")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["status"] == "completed"
    assert [row["round"] for row in report["rounds"]] == [1, 2, 3, 4, 5, 6]
    assert report["resumed_after_round"] == interrupted_at
    for name in ("east", "west"):
        ledger = NodePrivacyLedger(
            f"sqlite:///{run_dir / 'hospitals' / name / 'ledger.db'}",
            name,
            epsilon_cap=100.0,
            delta=1e-5,
        )
        # every round trained once, except possibly the one in flight at the interruption
        # (charged before training, so paid for even though its update was lost)
        assert ledger.rounds_participated() == 6
        assert ledger.total_steps() in (12, 14)
        assert report["privacy"]["hospitals"][name]["epsilon"] == pytest.approx(
            ledger.spent_epsilon(), rel=1e-9
        )
