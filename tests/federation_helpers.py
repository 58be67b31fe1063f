"""Running the real `fedllm` CLI (and so a real Flower SuperLink) from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
import yaml

TINY_TEST_MODEL = {
    "name": "tiny",
    "max_seq_length": 32,
    "tiny": {
        "layers": 1,
        "hidden_size": 32,
        "heads": 2,
        "pretrain_steps": 20,
        "pretrain_texts": 200,
    },
}


def flower_processes(root: Path) -> set[int]:
    """PIDs of processes started for a run under ``root``: the SuperLink, the ServerApp, the
    simulation runtime and Ray's daemons all inherit its ``FLWR_HOME`` (a run must leave none)."""
    found = set()
    for process in psutil.process_iter():
        with suppress(psutil.Error):
            if process.environ().get("FLWR_HOME", "").startswith(str(root)):
                found.add(process.pid)
    return found


def start_cli(log: Path, args: tuple[str, ...], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A long-running `fedllm` command (SuperLink, hospital, run) in its own process group,
    run from the app directory as its users run it, its output appended to ``log``; stop it
    with ``stop_process_tree``."""
    from fedllm.federation.experiment import APP_ROOT

    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "fedllm.cli", *args],
            cwd=APP_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def run_cli(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m fedllm.cli ARGS`` with a model cache private to ``root``."""
    env = dict(os.environ, FEDLLM_CACHE_DIR=str(root / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "fedllm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def run_experiment(root: Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Write ``config`` under ``root``, ``fedllm run`` it, return the run dir and its report."""
    config = {**config, "run": {**config["run"], "output_dir": str(root / "runs")}}
    config_file = root / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(config))
    result = run_cli(root, "run", str(config_file), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / config["run"]["name"], json.loads(result.stdout)


def randomised_lora_model(model_config, seed: int):
    """A LoRA model whose adapter weights are random (not the all-zero B of a fresh adapter),
    so that saving, publishing and loading it can be told apart from a fresh one."""
    import torch

    from fedllm.models.loading import load_lora_model

    model = load_lora_model(model_config, torch.device("cpu"), seed=seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter))
    return model
