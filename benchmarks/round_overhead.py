"""Round overhead at a hospital: a cold ClientApp process per message vs the warm worker.

Flower 1.42's deployment runtime starts one ``flwr-clientapp`` process per message. Cold (the
behaviour before the warm worker, and ``runtime.warm_worker: false``), that process imports
the ClientApp, builds the hospital's site (records, tokenizer, base model, ledger), trains and
replies. Warm (``fedllm hospital start``'s default), it imports the ClientApp without PyTorch
and forwards the message over the worker's Unix socket to ``fedllm hospital worker``, which
keeps the site loaded across rounds.

This benchmark plays the SuperNode: for each round it starts a fresh Python process that does
what ``flwr-clientapp`` does with a message (import ``fedllm.clients.client_app``, run the app
on the message and context, hand the reply back; messages travel as Flower's protobuf bytes),
once with the node config of a cold hospital and once with that of a warm one, alternating so
machine drift hits both alike. Per round it reports

* total: from starting that process with the message in hand to the reply bytes back;
* compute: the time spent in ``train_locally`` (``local_seconds`` of the ``hospital.trained``
  event in the log of the process that trained: the ClientApp process cold, the worker warm);
* overhead = total - compute, and overhead / compute.

Not included, in either mode alike: Flower's own transport (SuperLink to SuperNode) and the
``flwr-clientapp`` runtime's gRPC exchange with its SuperNode. The warm worker's first message
builds its site once; it is shown as round 1, apart from the later rounds' mean.

Two base models: fedllm's embedded ``tiny`` model, and a GPT-2-style model of about 100M
parameters built from a config (random weights, saved with a tokenizer to a temporary
directory and loaded as a local model path). Run:

    .venv/bin/python benchmarks/round_overhead.py [--rounds 3] [--local-steps 4]
        [--models tiny,gpt2-100m]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
MODELS = ("tiny", "gpt2-100m")
WORKER = [sys.executable, "-m", "fedllm.cli", "hospital", "worker"]


def handle_one_message(directory: Path) -> None:
    """What ``flwr-clientapp`` does with one message: load the app, run it, hand back the reply."""
    from fedllm.clients.client_app import app
    from fedllm.federation.warm_worker import decode_request, encode_request

    message, context = decode_request(
        (directory / "message.bin").read_bytes(), (directory / "context.bin").read_bytes()
    )
    reply = app(message, context)
    (directory / "reply.bin").write_bytes(encode_request(reply, context)[0])


def gpt2_100m(directory: Path) -> str:
    """A ~100M-parameter GPT-2 (random weights) and its tokenizer, saved as a local model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedllm.data import vocabulary_corpus
    from fedllm.models.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(vocabulary_corpus(0), vocab_size=2000)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=64,
            n_embd=768,
            n_layer=14,
            n_head=12,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def experiment(model_name: str, local_steps: int, rounds: int) -> dict[str, Any]:
    """Two simulated hospitals, DP-SGD on: the ClientApp trains hospital ``a``."""
    return {
        "run": {"rounds": rounds, "seed": 1},
        "federation": {
            "num_hospitals": 2,
            "cohort_size": 2,
            "hospitals": [{"name": "a", "data_size": 200}, {"name": "b", "data_size": 200}],
        },
        "model": {"name": model_name, "max_seq_length": 32},
        "training": {"local_steps": local_steps, "batch_size": 8, "learning_rate": 0.01},
        "privacy": {"target_epsilon": None, "noise_multiplier": 1.0},
        "evaluation": {"baselines": []},
    }


def logged_seconds(log: Path, name: str, key: str) -> list[float]:
    """``key`` of every ``name`` event in a JSON-lines log, in order."""
    seconds = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                seconds.append(float(event[key]))
    return seconds


class Bench:
    """One model's experiment, its global adapter, and the SuperNode side of each round."""

    def __init__(self, root: Path, model_name: str, args: argparse.Namespace) -> None:
        import torch
        from flwr.supercore.task_identity import TaskIdentity

        from fedllm.config import validate_config
        from fedllm.federation.experiment import experiment_json
        from fedllm.models.adapters import adapter_state
        from fedllm.models.loading import base_model, load_lora_model

        # Flower stamps an instruction message with the sending task's identity
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
        self.root = root
        config = validate_config(experiment(model_name, args.local_steps, args.rounds))
        # what the ServerApp puts in every message: the ClientApp reads no experiment file
        self.experiment = experiment_json(config)
        self.sha256 = base_model(config.model).sha256
        model = load_lora_model(config.model, torch.device("cpu"))
        self.adapter = adapter_state(model)
        self.parameters = sum(p.numel() for p in model.get_base_model().parameters())
        del model
        self.env = dict(os.environ, FEDLLM_LOG_JSON="1")

    def round(self, mode: str, server_round: int, node: dict[str, Any]) -> float:
        """One message through a fresh ClientApp process; seconds until its reply is back."""
        from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

        from fedllm.federation.experiment import EXPERIMENT
        from fedllm.federation.warm_worker import decode_request, encode_request

        settings = {
            "server-round": server_round,
            "run-id": mode,
            "run-dir": str(self.root / mode),
            "base-model-sha256": self.sha256,
            EXPERIMENT: self.experiment,
        }
        content = RecordDict(
            {"arrays": ArrayRecord(self.adapter), "config": ConfigRecord(settings)}
        )
        message = Message(content, dst_node_id=11, message_type="train")
        context = Context(1, 11, node, RecordDict(), {})
        directory = self.root / f"{mode}-{server_round}"
        directory.mkdir()
        message_bytes, context_bytes = encode_request(message, context)
        (directory / "message.bin").write_bytes(message_bytes)
        (directory / "context.bin").write_bytes(context_bytes)
        started = time.perf_counter()
        with (self.root / f"{mode}.log").open("ab") as log:
            subprocess.run(
                [sys.executable, __file__, "--handle", str(directory)],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=log,
                check=True,
            )
        reply_bytes = (directory / "reply.bin").read_bytes()
        elapsed = time.perf_counter() - started
        reply, _ = decode_request(reply_bytes, context_bytes)
        if reply.has_error():
            raise RuntimeError(f"{mode} round {server_round}: {reply.error.reason}")
        return elapsed

    def start_worker(self) -> tuple[subprocess.Popen[bytes], Path, float]:
        """``fedllm hospital worker`` for a hospital whose state dir is under the root."""
        from fedllm.federation.warm_worker import wait_until_listening, worker_socket_path

        (self.root / "notes.jsonl").write_text('{"text": "unused"}\n', "utf-8")
        hospital = {
            "hospital": "a",
            "superlink": {"address": "127.0.0.1:9092", "insecure": True},
            "data": {"path": "notes.jsonl"},
            "privacy": {"ledger_url": "sqlite:///hospital-ledger.db"},
            "runtime": {"state_dir": "state"},
        }
        hospital_file = self.root / "hospital.yaml"
        hospital_file.write_text(yaml.safe_dump(hospital), "utf-8")
        socket_path = worker_socket_path(self.root / "state")
        started = time.perf_counter()
        with (self.root / "worker.log").open("ab") as log:
            process = subprocess.Popen(
                [*WORKER, "--config", str(hospital_file)],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        if not wait_until_listening(socket_path, 300, lambda: process.poll() is None):
            raise RuntimeError(f"the worker did not start; see {self.root / 'worker.log'}")
        return process, socket_path, time.perf_counter() - started


def measure(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Cold and warm rounds of one model, alternating; per-round totals and compute."""
    from fedllm.federation.node_settings import WORKER_SOCKET

    with tempfile.TemporaryDirectory(prefix="ro-") as temporary:
        root = Path(temporary)
        if model != "tiny":  # its identity record is as temporary as the model
            os.environ["FEDLLM_CACHE_DIR"] = str(root / "cache")
        name = gpt2_100m(root / "gpt2-100m") if model == "gpt2-100m" else "tiny"
        bench = Bench(root, name, args)
        worker, socket_path, worker_start = bench.start_worker()
        node = {"partition-id": 0, "num-partitions": 2}
        totals: dict[str, list[float]] = {"cold": [], "warm": []}
        try:
            for server_round in range(1, args.rounds + 1):
                totals["cold"].append(bench.round("cold", server_round, node))
                warm_node = {**node, WORKER_SOCKET: str(socket_path)}
                totals["warm"].append(bench.round("warm", server_round, warm_node))
        finally:
            worker.terminate()
            worker.wait(timeout=60)
        compute = {
            "cold": logged_seconds(root / "cold.log", "hospital.trained", "local_seconds"),
            "warm": logged_seconds(root / "worker.log", "hospital.trained", "local_seconds"),
        }
        handled = logged_seconds(root / "worker.log", "warm_worker.handled", "seconds")
    return {
        "model": model,
        "parameters": bench.parameters,
        "worker_start_s": worker_start,
        "totals": totals,
        "compute": compute,
        "worker_handled": handled,
    }


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    """Round 1 and the mean of later rounds, per mode."""
    rows = []
    for mode in ("cold", "warm"):
        totals, compute = result["totals"][mode], result["compute"][mode]
        overheads = [total - seconds for total, seconds in zip(totals, compute, strict=True)]
        later = slice(1, None) if len(totals) > 1 else slice(0, None)
        mean_total = statistics.mean(totals[later])
        mean_compute = statistics.mean(compute[later])
        mean_overhead = statistics.mean(overheads[later])
        rows.append(
            [
                result["model"],
                f"{result['parameters'] / 1e6:.1f}M",
                mode,
                f"{totals[0]:.2f} s / {compute[0]:.2f} s",
                f"{mean_total:.2f} s",
                f"{mean_compute:.2f} s",
                f"{mean_overhead:.2f} s",
                f"{100 * mean_overhead / mean_compute:.0f}%",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--handle", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.handle is not None:
        handle_one_message(args.handle)
        return
    header = [
        "model",
        "parameters",
        "mode",
        "round 1 total / compute",
        "later rounds: total",
        "compute",
        "overhead",
        "overhead / compute",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    results = []
    for model in args.models.split(","):
        result = measure(model, args)
        results.append(result)
        lines += ["| " + " | ".join(row) + " |" for row in summary_rows(result)]
    print(json.dumps(results, indent=1))
    print(
        f"\nrounds {args.rounds}, local_steps {args.local_steps}, batch 8 x 32 tokens, DP-SGD; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for result in results:
        later = slice(1, None) if args.rounds > 1 else slice(0, None)
        handled = statistics.mean(result["worker_handled"][later])
        compute = statistics.mean(result["compute"]["warm"][later])
        total = statistics.mean(result["totals"]["warm"][later])
        print(
            f"{result['model']}: worker listening after {result['worker_start_s']:.1f} s; "
            f"warm later rounds: {handled:.2f} s in the worker's handler (compute "
            f"{compute:.2f} s), {total - handled:.2f} s in the ClientApp process "
            "(start, imports, socket)"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
