"""The shipped Prometheus alert rules are valid and fire exactly when their unit tests say.

``promtool`` (Debian package ``prometheus``; ``.ci/run`` installs it) checks
deploy/prometheus/alerts.yml and runs its unit tests, deploy/prometheus/alerts.test.yml. A
missing promtool fails these tests instead of skipping them: rules that were never evaluated
must not pass CI silently.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
RULE_TESTS = RULES_DIR / "alerts.test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: install Debian's `prometheus` package "
            "(apt-get install --no-install-recommends prometheus), as .ci/run does"
        )
    return path


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_shipped_rules_pass_promtool_check(promtool):
    result = run_promtool(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_shipped_rules_pass_their_unit_tests(promtool):
    result = run_promtool(promtool, "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_every_shipped_alert():
    """Each alert has a case where it fires and one where it must stay quiet."""
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if not case.get("exp_alerts")
    }
    assert firing == alerts
    assert quiet == alerts


@pytest.mark.parametrize(
    ("original", "broken", "alert"),
    [
        # a department must now spend ε = 2 an hour: the 1.2 ε the unit tests feed stays quiet
        ("[1h])) > 1", "[1h])) > 2", "FedllmDepartmentSpendingFast"),
        # the gauge must now hold for 10 minutes: the 3-minute burst no longer fires
        (
            "refused_burst == 1\n        for: 1m",
            "refused_burst == 1\n        for: 10m",
            "FedllmQuotaRefusalBurst",
        ),
        # a reworded annotation is caught too, not only whether the alert fires
        ("a script retrying", "someone retrying", "FedllmQuotaRefusalBurst"),
    ],
    ids=["threshold", "for-duration", "annotation"],
)
def test_a_broken_copy_of_the_rules_fails_the_unit_tests(
    promtool, tmp_path, original, broken, alert
):
    text = RULES.read_text()
    assert text.count(original) == 1
    (tmp_path / "alerts.yml").write_text(text.replace(original, broken))
    shutil.copy(RULE_TESTS, tmp_path / "alerts.test.yml")
    assert run_promtool(promtool, "check", "rules", tmp_path / "alerts.yml").returncode == 0
    result = run_promtool(promtool, "test", "rules", tmp_path / "alerts.test.yml")
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr
    assert alert in result.stdout + result.stderr
