"""fedllm installs one top-level name, ``fedllm``, and its Flower layers import the same way
from every layout they run in.

A wheel puts the Flower layers inside the library (``fedllm.strategies``, ``fedllm.clients``)
and installs no ``examples`` (opacus installs one), so nothing of fedllm's can collide with
another project's module in site-packages. A checkout, and the app bundle (FAB) Flower builds
from one, keep ``strategies/`` and ``clients/`` beside ``fedllm/``, which gives them the same
names (fedllm/__init__.py). Each layout is checked as it is used: the wheel that pip builds,
installed without its dependencies into a fresh environment that never sees the repository;
the bundle that Flower builds, installed and loaded by the functions ``flwr-clientapp`` and
``flwr-serverapp`` use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from wheel_helpers import ROOT, build_wheel, copy_checkout

# What a Flower app of this project is made of (tests/test_flwr_run.py copies the same).
APP = ["configs", "strategies", "clients", "fedllm", "examples", "pyproject.toml", "README.md"]
GENERIC_NAMES = ("strategies", "clients", "examples")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would put the checkout on ``sys.path``."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    return {**env, **extra}


def _run_python(python: Path, script: str, cwd: Path, env: dict[str, str], *args: str) -> dict:
    """Run ``script`` and return the JSON object its last line prints."""
    result = subprocess.run(
        [str(python), "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# Each script loads both components as pyproject.toml names them, then reports (last line) which
# file every fedllm module came from and whether a generic top-level name was imported.
MODULES_REPORT = """
print(json.dumps({
    "client": type(client).__name__,
    "server": type(server).__name__,
    "files": {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
              if name == "fedllm" or name.startswith("fedllm.")},
    "generic": sorted(set(sys.modules) & {"strategies", "clients", "examples"}),
}))
"""
# From an installed wheel, in a directory of the user's own: their subclass passes the
# strategy-class check, and Flower loads both components.
INSTALLED = (
    """
import json, sys
from pathlib import Path
from flwr.supercore.object_ref import load_app
from fedllm.strategies.contract import check_strategy_class
check_strategy_class("fair:FairnessFirstStrategy", Path.cwd())
client = load_app("fedllm.clients.client_app:app", ValueError, Path.cwd())
server = load_app("fedllm.strategies.server_app:app", ValueError, Path.cwd())
"""
    + MODULES_REPORT
)
# As a SuperNode's flwr-clientapp and a SuperLink's flwr-serverapp do: install the FAB
# (argv[1]) under FLWR_HOME, then load each component from the installed app's directory.
BUNDLE = (
    """
import hashlib, json, sys
from pathlib import Path
from flwr.cli.config_utils import get_fab_metadata
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_config, get_project_dir
from flwr.supercore.object_ref import load_app
content = Path(sys.argv[1]).read_bytes()
install_from_fab(content, skip_prompt=True)
fab_id, fab_version = get_fab_metadata(content)
fab_hash = hashlib.sha256(content).hexdigest()
client = get_load_client_app_fn("", None, multi_app=True)(fab_id, fab_version, fab_hash)
app_dir = get_project_dir(fab_id, fab_version, fab_hash)
components = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]
server = load_app(components["serverapp"], ValueError, str(app_dir))
"""
    + MODULES_REPORT
)
USER_STRATEGY = """
from fedllm.strategies.privacy_aware import HospitalView, PrivacyAwareStrategy


class FairnessFirstStrategy(PrivacyAwareStrategy):
    def utility(self, view: HospitalView, server_round: int) -> float:
        return super().utility(view, server_round) / (1 + view.times_selected)
"""


def test_the_wheel_holds_fedllm_alone_and_all_of_it(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        top_level = archive.read("fedllm-0.1.0.dist-info/top_level.txt").decode()

    assert {name.split("/")[0] for name in names} == {"fedllm", "fedllm-0.1.0.dist-info"}
    assert top_level.split() == ["fedllm"]
    # every module of the checkout is in it: the library's own and the Flower layers, inside it
    expected = {
        f"fedllm/{path.relative_to(ROOT / 'fedllm')}" for path in ROOT.glob("fedllm/**/*.py")
    }
    for layer in ("strategies", "clients"):
        expected |= {f"fedllm/{layer}/{path.name}" for path in (ROOT / layer).glob("*.py")}
    assert expected <= names, sorted(expected - names)
    assert not any(name.startswith(("fedllm/examples/", "examples/")) for name in names)


def test_an_installed_wheel_works_without_the_repository(wheel, tmp_path):
    # A fresh environment holding only the wheel. Its dependencies come from this test's
    # environment as one plain sys.path entry (a .pth line), after the environment's own
    # site-packages: that environment's own .pth files (the checkout's editable install) stay
    # unread. (`venv --system-site-packages` would see the base interpreter's site-packages,
    # not those of the virtual environment running the tests.)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            str(wheel),
        ],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # the dependencies only now, so that pip installs into a bare environment
    (site_packages / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    assert not any((site_packages / name).exists() for name in GENERIC_NAMES)

    # a directory of the user's own, as an ML engineer writes a strategy subclass
    work = tmp_path / "work"
    work.mkdir()
    (work / "fair.py").write_text(USER_STRATEGY)
    env = _clean_env()

    cli = subprocess.run(
        [str(venv / "bin" / "fedllm"), "--help"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "Usage" in cli.stdout

    report = _run_python(python, INSTALLED, work, env)

    assert (report["client"], report["server"]) == ("ClientApp", "ServerApp")
    assert "fedllm.strategies.privacy_aware" in report["files"]
    assert "fedllm.clients.client_app" in report["files"]
    outside = {
        name: file
        for name, file in report["files"].items()
        if not Path(file).is_relative_to(site_packages)
    }
    assert not outside, outside
    assert report["generic"] == []


def test_flowers_app_bundle_loads_its_own_copy_of_the_layers(tmp_path):
    project = copy_checkout(APP, tmp_path / "project")
    fab = tmp_path / "app.fab"
    fab.write_bytes(build_fab_from_disk(project))
    with zipfile.ZipFile(fab) as archive:
        bundled = set(archive.namelist())
    # the bundle keeps the checkout's layout: the layers beside the library, not inside it
    assert {"fedllm/__init__.py", "strategies/server_app.py", "clients/client_app.py"} <= bundled
    assert not any(name.startswith("fedllm/strategies/") for name in bundled)

    flwr_home = tmp_path / "flwr-home"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    report = _run_python(
        Path(sys.executable), BUNDLE, elsewhere, _clean_env(FLWR_HOME=str(flwr_home)), str(fab)
    )

    assert (report["client"], report["server"]) == ("ClientApp", "ServerApp")
    app_dir = Path(report["files"]["fedllm"]).parents[1]
    assert app_dir.is_relative_to(flwr_home)
    assert report["files"]["fedllm.strategies.server_app"] == str(
        app_dir / "strategies" / "server_app.py"
    )
    assert report["files"]["fedllm.clients.client_app"] == str(
        app_dir / "clients" / "client_app.py"
    )
    outside = {
        name: file
        for name, file in report["files"].items()
        if not Path(file).is_relative_to(app_dir)
    }
    assert not outside, outside
    assert report["generic"] == []
