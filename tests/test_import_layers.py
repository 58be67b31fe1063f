"""Every dependency points down: the import-linter contracts in pyproject.toml hold.

The layers (docs/architecture.md#layers) are checked by running ``lint-imports`` as a user
would, on this checkout; a copy of the code with one upward import written into it shows that
the check can fail and names the offending import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("fedllm", "strategies", "clients")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages under ``root``, with its pyproject.toml's contracts."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_dependency_points_down():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    storage = tmp_path / "fedllm" / "storage" / "files.py"
    storage.write_text(
        storage.read_text(encoding="utf-8") + "\nfrom fedllm.privacy import events  # noqa\n",
        encoding="utf-8",
    )

    result = _lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Every dependency points down BROKEN" in result.stdout, result.stdout
    assert "fedllm.storage.files -> fedllm.privacy.events" in result.stdout, result.stdout
