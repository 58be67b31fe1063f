"""Every dependency points down: the import-linter contracts in pyproject.toml hold.

The layers (docs/architecture.md#layers) are checked by running ``lint-imports`` as a user
would: on this checkout, where it sees the library alone (the Flower layers lie beside
``fedllm/`` there, out of import-linter's sight), and on the layout of the wheel pip builds,
where ``fedllm.strategies`` and ``fedllm.clients`` lie inside it and every contract applies.
Copies of that layout with one forbidden import written into them show that the check can
fail and names the offending import. Keys and settings enter at the edge: only the entry
points import fedllm.security.environment (a contract), and no module of the leaf packages
reads ``os.environ`` or ``os.getenv`` itself (a scan of their syntax trees).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wheel_helpers import ROOT, build_wheel, unpack_wheel

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def _lint_imports(packages: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages under ``packages``, with this checkout's contracts."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=packages,
        env={**os.environ, "PYTHONPATH": str(packages)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_dependency_points_down_in_the_checkout():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_every_dependency_points_down_in_the_wheel(wheel, tmp_path):
    result = _lint_imports(unpack_wheel(wheel, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "added_import", "reported"),
    [
        # a lower layer of the library importing a higher one
        (
            "fedllm/storage/files.py",
            "from fedllm.privacy import events",
            "fedllm.storage.files -> fedllm.privacy.events",
        ),
        # the library importing the Flower layers above it
        (
            "fedllm/federation/hospital.py",
            "from fedllm.strategies import rounds",
            "fedllm.federation.hospital -> fedllm.strategies.rounds",
        ),
        # the client side importing the server side (independent layers)
        (
            "fedllm/clients/client_app.py",
            "from fedllm.strategies import rounds",
            "fedllm.clients.client_app -> fedllm.strategies.rounds",
        ),
    ],
)
def test_a_forbidden_import_breaks_the_layers(wheel, tmp_path, module, added_import, reported):
    packages = unpack_wheel(wheel, tmp_path)
    source = packages / module
    source.write_text(
        source.read_text(encoding="utf-8") + f"\n{added_import}  # noqa\n", encoding="utf-8"
    )

    result = _lint_imports(packages)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Every dependency points down BROKEN" in result.stdout, result.stdout
    assert reported in result.stdout, result.stdout


def test_a_leaf_importing_the_key_environment_breaks_the_edge_contract(wheel, tmp_path):
    packages = unpack_wheel(wheel, tmp_path)
    checkpoints = packages / "fedllm" / "models" / "checkpoints.py"
    checkpoints.write_text(
        checkpoints.read_text(encoding="utf-8")
        + "\nfrom fedllm.security.environment import keyring_from_environment  # noqa\n",
        encoding="utf-8",
    )

    result = _lint_imports(packages)

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
