"""Every dependency points down: the import-linter contracts in pyproject.toml hold.

The layers (docs/architecture.md#layers) are checked by running ``lint-imports`` as a user
would, on this checkout; a copy of the code with one upward import written into it shows that
the check can fail and names the offending import. Keys and settings enter at the edge: only
the entry points import fedllm.security.environment (a contract), and no module of the leaf
packages reads ``os.environ`` or ``os.getenv`` itself (a scan of their syntax trees).
"""

from __future__ import annotations

import ast
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


def test_a_leaf_importing_the_key_environment_breaks_the_edge_contract(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    checkpoints = tmp_path / "fedllm" / "models" / "checkpoints.py"
    checkpoints.write_text(
        checkpoints.read_text(encoding="utf-8")
        + "\nfrom fedllm.security.environment import keyring_from_environment  # noqa\n",
        encoding="utf-8",
    )

    result = _lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Only entry points read key rings from the environment BROKEN" in result.stdout
    assert "Every dependency points down KEPT" in result.stdout, result.stdout


# Packages below the entry points whose modules take keys and settings as arguments.
LEAF_PACKAGES = (
    "fedllm/privacy",
    "fedllm/models",
    "fedllm/training",
    "fedllm/storage",
    "fedllm/data",
    "fedllm/config",
    "fedllm/aggregation",
    "fedllm/selection",
    "fedllm/security/encryption.py",
)
# Justified exceptions, each with its reason; the test also fails when one stops reading.
ENVIRONMENT_READERS = {
    "fedllm/models/identity.py": "FEDLLM_CACHE_DIR names a machine-wide cache of built models "
    "(like HF_HOME), not a key or a policy: every process on the machine must agree on it",
}


def environment_reads(source: str) -> list[int]:
    """Lines of ``source`` that touch ``os.environ`` / ``os.getenv`` (or import them)."""
    names = {"environ", "getenv", "environb"}
    lines = []
    for node in ast.walk(ast.parse(source)):
        attribute = isinstance(node, ast.Attribute) and node.attr in names
        imported = (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(alias.name in names for alias in node.names)
        )
        if attribute or imported:
            lines.append(node.lineno)
    return lines


def _leaf_modules() -> list[Path]:
    files = []
    for entry in LEAF_PACKAGES:
        path = ROOT / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def test_leaf_packages_take_keys_and_settings_as_arguments():
    readers = {}
    for path in _leaf_modules():
        lines = environment_reads(path.read_text(encoding="utf-8"))
        if lines:
            readers[path.relative_to(ROOT).as_posix()] = lines
    unexpected = {name: lines for name, lines in readers.items() if name not in ENVIRONMENT_READERS}
    assert not unexpected, f"leaf modules read the environment (pass it in instead): {unexpected}"
    assert set(readers) == set(ENVIRONMENT_READERS), "an allowed reader no longer reads: drop it"


def test_the_environment_scan_sees_each_form_of_read():
    assert environment_reads("import os\nos.environ.get('A')\n") == [2]
    assert environment_reads("import os\nx = os.getenv('A')\n") == [2]
    assert environment_reads("from os import environ\n") == [1]
    assert environment_reads("import os\nos.path.join('a')\n") == []
