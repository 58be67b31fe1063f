"""`fedllm` starts fast: listing commands or computing one ε imports no ML or web stack.

Each check runs in a fresh interpreter, because the test process itself has long imported
torch and friends.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedllm.cli.app import FedllmGroup, app
from fedllm.cli.privacy import PrivacyGroup

FEDLLM = str(Path(sys.executable).with_name("fedllm"))
HEAVY = ("torch", "transformers", "peft", "opacus", "fastapi", "matplotlib")
# README.md: fedllm privacy epsilon --noise-multiplier 1.1 --sample-rate 0.01 --steps 1000 ...
README_EPSILON = shlex.split("--noise-multiplier 1.1 --sample-rate 0.01 --steps 1000 --delta 1e-5")


def _heavy_modules_after(code: str) -> list[str]:
    """Run `code` in a fresh interpreter and return the heavy packages it imported."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_cli_loads_no_heavy_library():
    assert _heavy_modules_after("import fedllm.cli.app") == []


def test_help_and_epsilon_run_without_heavy_libraries():
    loaded = _heavy_modules_after(
        "from fedllm.cli.app import app\n"
        "for args in (['--help'], ['privacy', '--help'],"
        f" ['privacy', 'epsilon', *{README_EPSILON!r}]):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (args, exit.code)\n"
    )
    assert loaded == []


def test_help_lists_every_command_through_the_console_script():
    result = subprocess.run(
        [FEDLLM, "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    for name in FedllmGroup.lazy_commands:
        assert f" {name} " in result.stdout


def test_readme_epsilon_command_prints_epsilon():
    result = subprocess.run(
        [FEDLLM, "privacy", "epsilon", *README_EPSILON],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.startswith("ε = 2.4778 at δ = 1e-05 (pld, replace-one;")


def test_a_typo_suggests_a_lazy_command():
    result = CliRunner().invoke(app, ["rnu"])
    assert result.exit_code == 2
    assert "Did you mean 'run'?" in result.output


@pytest.mark.parametrize(
    ("group", "path"),
    [(FedllmGroup, []), (PrivacyGroup, ["privacy"])],
    ids=["fedllm", "privacy"],
)
def test_every_listed_command_loads_and_its_help_matches_the_listing(group, path):
    """The listing is a table; this keeps it pointing at real commands with the same help."""
    for name, lazy in group.lazy_commands.items():
        command = lazy.load(name)
        first_paragraph = " ".join((command.help or "").split("\n\n")[0].split())
        assert first_paragraph == lazy.short_help, name
        result = CliRunner().invoke(app, [*path, name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert lazy.short_help in result.output, name
