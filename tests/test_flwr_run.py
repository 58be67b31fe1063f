"""The README's `flwr run` block, played exactly as written, in a copy of the project.

Flower's CLI starts a local SuperLink on a fixed port and leaves it running; the test gives it
a private FLWR_HOME, checks that it was started with runtime dependency installation disabled
(else Flower pip-installs the app's dependencies, a multi-GB CUDA torch), and stops it and
everything below it afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SUPERLINK_PORT = 39091  # Flower 1.42's fixed local SuperLink port
COPIED = ["configs", "strategies", "clients", "fedllm", "examples", "pyproject.toml", "README.md"]

pytestmark = pytest.mark.integration


def readme_flwr_block() -> str:
    """The README's bash block that runs `flwr run` (the only one that does)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    matching = [block for block in blocks if "flwr run" in block]
    assert len(matching) == 1, "the README should show flwr run in exactly one bash block"
    return matching[0]


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _processes_using(flwr_home: Path) -> list[psutil.Process]:
    """Every process started for this FLWR_HOME (the local SuperLink and its descendants)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with suppress(psutil.Error):
            if any(str(flwr_home) in part for part in process.info["cmdline"] or []):
                found.append(process)
    tree = list(found)
    for process in found:
        with suppress(psutil.Error):
            tree.extend(process.children(recursive=True))
    return tree


def _cmdline(process: psutil.Process) -> list[str]:
    """A process's command line; empty for one that ended (or is a zombie) meanwhile."""
    with suppress(psutil.Error):
        return process.cmdline()
    return []


def _environment(process: psutil.Process) -> dict[str, str]:
    with suppress(psutil.Error):
        return process.environ()
    return {}


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], Path]]:
    """A copy of the project (the README's `.` and `.venv`), its environment, its FLWR_HOME."""
    if _port_in_use(LOCAL_SUPERLINK_PORT):
        pytest.fail(
            f"a local SuperLink (or something else) already listens on {LOCAL_SUPERLINK_PORT}: "
            "flwr run would reuse it, so this test could not check how it was started"
        )
    copy = tmp_path / "project"
    copy.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "runs", "*.egg-info")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=ignore)
        else:
            shutil.copy2(source, copy / name)
    (copy / ".venv").symlink_to(ROOT / ".venv")
    flwr_home = tmp_path / "flwr-home"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "VIRTUAL_ENV"}
    }
    env["FLWR_HOME"] = str(flwr_home)
    try:
        yield copy, env, flwr_home
    finally:
        tree = _processes_using(flwr_home)
        for process in tree:
            with suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(tree, timeout=15)
        for process in alive:
            with suppress(psutil.Error):
                process.kill()


def test_readme_flwr_run_block_runs_as_written(project):
    copy, env, flwr_home = project
    block = readme_flwr_block()
    result = subprocess.run(
        ["bash", "-e", "-c", block],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    environments = [
        _environment(process)
        for process in _processes_using(flwr_home)
        if "flower-superlink" in " ".join(_cmdline(process))
    ]
    assert environments, "flwr run should have started a local SuperLink under FLWR_HOME"
    for environment in environments:
        assert environment.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1"

    # --stream shows the ServerApp's log, which says where each run is written
    runs = block.count("flwr run ")
    assert output.count("run.started") == runs, output[-4000:]
    reports = sorted((copy / "runs").glob("*/report.json"), key=lambda path: path.stat().st_mtime)
    assert len(reports) == runs
    for path in reports:
        report = json.loads(path.read_text())
        assert report["status"] == "completed", report.get("causes")
        assert len(report["rounds"]) == report["config"]["run"]["rounds"]
        assert report["run_dir"] in output
    first = json.loads(reports[0].read_text())
    assert first["config"]["run"]["rounds"] == 1  # num-server-rounds=1, a Flower-style key
    assert first["config"]["training"]["local_steps"] == 5
