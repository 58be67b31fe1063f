"""Where a warm train round's time goes in the ClientApp's handler, beyond ``train_locally``.

Runs the ClientApp's ``train`` handler in this process, as the hospital's worker does, with a
site kept across rounds: two rounds to warm up, then ``--rounds`` profiled rounds (cProfile).
Hospital ``a`` of two simulated hospitals, DP-SGD (noise multiplier 1.0), ``local_steps`` 4,
batch 8 x 32 tokens, the ``tiny`` model. Only train messages are sent, so every charge
composes a new total (in a real round the status query has composed it first). Prints the
handler's time per round and, per round, the cumulative time of the functions that matter.
Run (``PYTHONPATH`` picks the code to profile):

    .venv/bin/python benchmarks/handler_profile.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

FUNCTIONS = (
    ("fedllm/training/local.py", "train_locally"),
    ("fedllm/privacy/node_ledger.py", "charge"),
    ("fedllm/privacy/node_ledger.py", "spent_epsilon"),
    ("fedllm/models/adapters.py", "load_adapter_state"),
    ("fedllm/models/adapters.py", "adapter_state"),
    ("fedllm/federation/experiment.py", "experiment_from_message"),
)


def experiment(local_steps: int, rounds: int) -> dict[str, Any]:
    """Two simulated hospitals, DP-SGD on: the handler trains hospital ``a``."""
    return {
        "run": {"rounds": rounds, "seed": 1},
        "federation": {
            "num_hospitals": 2,
            "cohort_size": 2,
            "hospitals": [{"name": "a", "data_size": 200}, {"name": "b", "data_size": 200}],
        },
        "model": {"name": "tiny", "max_seq_length": 32},
        "training": {"local_steps": local_steps, "batch_size": 8, "learning_rate": 0.01},
        "privacy": {"target_epsilon": None, "noise_multiplier": 1.0},
        "evaluation": {"baselines": []},
    }


def main() -> None:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedllm.clients.client_app import app
    from fedllm.config import validate_config
    from fedllm.federation.experiment import EXPERIMENT, experiment_json
    from fedllm.models.adapters import adapter_state
    from fedllm.models.loading import base_model, load_lora_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    # Flower stamps an instruction message with the sending task's identity
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
    config = validate_config(experiment(4, args.rounds + 2))
    settings = {
        "run-id": "profile",
        "run-dir": str(Path(tempfile.mkdtemp(prefix="hp-")) / "run"),
        "base-model-sha256": base_model(config.model).sha256,
        EXPERIMENT: experiment_json(config),
    }
    adapter = adapter_state(load_lora_model(config.model, torch.device("cpu")))
    context = Context(1, 11, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})

    def train(server_round: int) -> float:
        content = {"server-round": server_round, **settings}
        records = RecordDict({"arrays": ArrayRecord(adapter), "config": ConfigRecord(content)})
        started = time.perf_counter()
        reply = app(Message(records, dst_node_id=11, message_type="train"), context)
        if reply.has_error():
            raise RuntimeError(reply.error.reason)
        return time.perf_counter() - started

    train(1)
    train(2)
    profile = cProfile.Profile()
    seconds = []
    for server_round in range(3, args.rounds + 3):
        profile.enable()
        seconds.append(train(server_round))
        profile.disable()
    print("handler seconds per warm round:", [round(s, 3) for s in seconds])
    print(f"handler: {sum(seconds) / len(seconds):.3f} s per round")
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    for (path, _, name), (_, _, _, cumulative, _) in stats.items():
        for suffix, wanted in FUNCTIONS:
            if name == wanted and path.endswith(suffix):
                print(f"{name}: {cumulative / len(seconds):.3f} s per round")


if __name__ == "__main__":
    main()
