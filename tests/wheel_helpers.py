"""Copies of this checkout for tests (a docs sandbox, an app bundle) and fedllm's wheel, built
by pip from such a copy, for the tests of what it installs.

A copy, so that no ``build/`` left in the checkout by an earlier build can add stale files to
the wheel; ``--no-build-isolation``, so that the build uses the environment's setuptools and
needs no package index.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What setuptools reads to build the wheel; examples/ too, to show it stays out.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "fedllm", "strategies", "clients", "examples")


def copy_checkout(names: tuple[str, ...], destination: Path) -> Path:
    """Copy the named files and directories of the checkout into ``destination`` (made here),
    without bytecode caches; return ``destination``."""
    destination.mkdir(parents=True)
    for name in names:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, destination / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, destination / name)
    return destination


def build_wheel(work: Path) -> Path:
    """Build fedllm's wheel from a copy of the checkout under ``work``; return its path."""
    source = copy_checkout(SOURCES, work / "source")
    wheels = work / "wheels"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = wheels.glob("fedllm-*.whl")
    return wheel


def unpack_wheel(wheel: Path, target: Path) -> Path:
    """The files of ``wheel`` laid out under ``target`` as site-packages would hold them."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target
