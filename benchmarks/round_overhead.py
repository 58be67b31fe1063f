"""Round overhead at a hospital: a cold ClientApp process per message vs the warm worker.

Cold (Flower's default, and ``runtime.warm_worker: false``): Flower 1.42 starts one
``flwr-clientapp`` process per message, which imports the ClientApp, builds the hospital's
site (records, tokenizer, base model, ledger), trains and replies. The benchmark plays that
SuperNode: for each round it starts a fresh Python process that does what ``flwr-clientapp``
does with a message (import ``fedllm.clients.client_app``, run the app on the message and context,
hand the reply back; messages travel as Flower's protobuf bytes). Total: from starting that
process with the message in hand to the reply bytes back.

Warm (``fedllm hospital start``'s default): a real deployment on loopback. ``fedllm superlink
start --insecure``, ``fedllm hospital start`` (``flower-supernode --isolation process`` and
``fedllm hospital worker``, its executor) and ``fedllm run --federation`` of the same
experiment. Total, per train message, as the worker logs it: from the SuperNode queueing the
message as a task on its Runtime API to the reply and task output pushed back to it (the poll
until the worker claims it included).

Warm, at the SuperNode: the same train messages from the SuperNode's own log (timestamps on,
``fedllm.federation.supernode_process``): from logging the message's arrival from the SuperLink
to logging its reply sent back, so it includes the SuperNode's transfers of the message's
objects from and to the SuperLink: "message received to reply sent" at the hospital.

Both modes train the same hospital on the same records with the same experiment. Per round:

* compute: the time in ``train_locally`` (``local_seconds`` of the ``hospital.trained`` event
  in the log of the process that trained: the ClientApp process cold, the worker warm);
* overhead = total - compute, and overhead / compute.

Cold, Flower's transport between SuperLink and SuperNode is not included. Warm rounds also run
the run's other messages (status query, evaluation); their handling is reported per round
beside the train message, and so is the whole round's time at the researcher (the run
report's ``duration_s``).

Two base models: fedllm's embedded ``tiny`` model, and a GPT-2-style model of about 100M
parameters built from a config (random weights, saved with a tokenizer to a temporary
directory and loaded as a local model path). Run:

    .venv/bin/python benchmarks/round_overhead.py [--rounds 3] [--local-steps 4]
        [--batch-size 8] [--max-length 32] [--models tiny,gpt2-100m]

(the quick start's rounds: ``--local-steps 15 --batch-size 64 --max-length 64``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

REPO = Path(__file__).resolve().parents[1]
MODELS = ("tiny", "gpt2-100m")
FEDLLM = [sys.executable, "-m", "fedllm.cli"]
HOSPITAL = "north"


def encode(message: Message, context: Context) -> tuple[bytes, bytes]:
    """A message and its context as Flower's protobuf bytes."""
    return (
        message_to_proto(message).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )


def decode(message_bytes: bytes, context_bytes: bytes) -> tuple[Message, Context]:
    """The inverse of :func:`encode`."""
    return (
        message_from_proto(ProtoMessage.FromString(message_bytes)),
        context_from_proto(ProtoContext.FromString(context_bytes)),
    )


def handle_one_message(directory: Path) -> None:
    """What ``flwr-clientapp`` does with one message: load the app, run it, hand back the reply."""
    from fedllm.clients.client_app import app

    message, context = decode(
        (directory / "message.bin").read_bytes(), (directory / "context.bin").read_bytes()
    )
    reply = app(message, context)
    (directory / "reply.bin").write_bytes(encode(reply, context)[0])


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


def experiment(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One deployed hospital, DP-SGD on, every round's cohort is that hospital."""
    return {
        "run": {"name": "overhead", "rounds": args.rounds, "seed": 1},
        "federation": {"num_hospitals": 1, "cohort_size": 1, "hospitals": [{"name": HOSPITAL}]},
        "model": {"name": model_name, "max_seq_length": args.max_length},
        "training": {
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "learning_rate": 0.01,
            "device": "cpu",
        },
        "privacy": {"target_epsilon": None, "noise_multiplier": 1.0},
        "evaluation": {"baselines": [], "release": "dp", "max_eval_sequences": 16},
        "strategy": {"selection": "random", "min_cohort": 1, "round_timeout_s": 1800},
    }


def write_records(path: Path) -> None:
    """The hospital's own records file: 200 synthetic notes of about 70 patients."""
    from fedllm.data import generate_clinical_records

    records = generate_clinical_records(200, None, seed=7, hospital_tag=HOSPITAL)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            row = {"text": record.text, "patient": record.patient_id}
            handle.write(json.dumps(row) + "\n")


def logged_events(log: Path, name: str) -> list[dict[str, Any]]:
    """Every ``name`` event in a JSON-lines log, in order."""
    events = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                events.append(event)
    return events


SUPERNODE_EVENT = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*?(Receiving: (\w+) message|Sent successfully)"
)


def supernode_spans(log: Path) -> list[tuple[str, float]]:
    """Per message, in order: its type and the seconds from the SuperNode logging its arrival
    from the SuperLink to logging its reply sent back (``supernode.log``, timestamps on)."""
    spans, arrived = [], None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if (match := SUPERNODE_EVENT.search(line)) is None:
            continue
        stamp = time.mktime(time.strptime(match[1][:19], "%Y-%m-%d %H:%M:%S"))
        stamp += int(match[1][20:]) / 1000
        if match[3] is not None:
            arrived = (match[3], stamp)
        elif arrived is not None:
            spans.append((arrived[0], stamp - arrived[1]))
            arrived = None
    return spans


def logged_seconds(log: Path, name: str, key: str) -> list[float]:
    """``key`` of every ``name`` event in a JSON-lines log, in order."""
    return [float(event[key]) for event in logged_events(log, name)]


class Bench:
    """One model's experiment, its hospital, and both modes' rounds."""

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
        self.rounds = args.rounds
        self.raw = experiment(model_name, args)
        config = validate_config(self.raw)
        # what the ServerApp puts in every message: the ClientApp reads no experiment file
        self.experiment = experiment_json(config)
        self.sha256 = base_model(config.model).sha256
        model = load_lora_model(config.model, torch.device("cpu"))
        self.adapter = adapter_state(model)
        self.parameters = sum(p.numel() for p in model.get_base_model().parameters())
        del model
        self.env = dict(os.environ, FEDLLM_LOG_JSON="1", FLWR_HOME=str(root / "researcher"))
        write_records(root / "notes.jsonl")

    def hospital_yaml(self, mode: str, port: int) -> Path:
        """The hospital's ``hospital.yaml``; each mode has its own ledger and state dir."""
        from fedllm.federation.launcher import free_port

        hospital = {
            "hospital": HOSPITAL,
            "superlink": {"address": f"127.0.0.1:{port}", "insecure": True},
            "data": {"path": "notes.jsonl", "patient_field": "patient"},
            "privacy": {"ledger_url": f"sqlite:///{mode}-ledger.db"},
            "runtime": {"state_dir": f"{mode}-state", "clientapp_port": free_port()},
        }
        path = self.root / f"{mode}-hospital.yaml"
        path.write_text(yaml.safe_dump(hospital), "utf-8")
        return path

    def cold_round(self, server_round: int, node: dict[str, Any]) -> float:
        """One message through a fresh ClientApp process; seconds until its reply is back."""
        from flwr.app import ArrayRecord, ConfigRecord, RecordDict

        from fedllm.federation.experiment import EXPERIMENT

        settings = {
            "server-round": server_round,
            "run-id": "cold",
            "run-dir": str(self.root / "cold"),
            "base-model-sha256": self.sha256,
            EXPERIMENT: self.experiment,
        }
        content = RecordDict(
            {"arrays": ArrayRecord(self.adapter), "config": ConfigRecord(settings)}
        )
        message = Message(content, dst_node_id=11, message_type="train")
        context = Context(1, 11, node, RecordDict(), {})
        directory = self.root / f"cold-{server_round}"
        directory.mkdir()
        message_bytes, context_bytes = encode(message, context)
        (directory / "message.bin").write_bytes(message_bytes)
        (directory / "context.bin").write_bytes(context_bytes)
        started = time.perf_counter()
        with (self.root / "cold.log").open("ab") as log:
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
        reply, _ = decode(reply_bytes, context_bytes)
        if reply.has_error():
            raise RuntimeError(f"cold round {server_round}: {reply.error.reason}")
        return elapsed

    def cold(self) -> tuple[list[float], list[float]]:
        """Every round through its own process; totals and compute."""
        from fedllm.federation.deployment import hospital_node_config
        from fedllm.federation.hospital_config import load_hospital_config

        hospital = load_hospital_config(self.hospital_yaml("cold", 9092))
        node = hospital_node_config(hospital)
        totals = [self.cold_round(n, node) for n in range(1, self.rounds + 1)]
        compute = logged_seconds(self.root / "cold.log", "hospital.trained", "local_seconds")
        return totals, compute

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.out").open("ab") as log:
            return subprocess.Popen(
                [*FEDLLM, *args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_for(self, name: str, process: subprocess.Popen[bytes], text: str) -> None:
        deadline = time.monotonic() + 600
        while text not in (self.root / f"{name}.out").read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {self.root / f'{name}.out'}")
            time.sleep(0.3)

    def warm(self) -> dict[str, Any]:
        """A deployed run whose hospital's worker runs its tasks; what the worker logged."""
        from fedllm.federation.flower_cli import write_flower_connection
        from fedllm.federation.launcher import free_port, stop_process_tree

        port, control = free_port(), free_port()
        write_flower_connection(
            self.root / "researcher", "local", f"127.0.0.1:{control}", None, insecure=True
        )
        superlink_args = ["--insecure", "--host", "127.0.0.1", "--port", str(port)]
        superlink_args += ["--control-port", str(control), "--state-dir", str(self.root / "sl")]
        hospital = self.hospital_yaml("warm", port)
        config_file = self.root / "experiment.yaml"
        run_section = {**self.raw["run"], "output_dir": str(self.root / "runs")}
        config_file.write_text(yaml.safe_dump({**self.raw, "run": run_section}))
        processes = []
        try:
            processes.append(self.start("superlink", "superlink", "start", *superlink_args))
            self.wait_for("superlink", processes[-1], "Ctrl-C stops")
            started = time.perf_counter()
            processes.append(self.start("hospital", "hospital", "start", "--config", str(hospital)))
            self.wait_for("hospital", processes[-1], "Ctrl-C stops")
            worker_start = time.perf_counter() - started
            run = ["run", str(config_file), "--federation", "local", "--json"]
            processes.append(self.start("run", *run))
            if processes[-1].wait() != 0:
                raise RuntimeError(f"the warm run failed; see {self.root / 'run.out'}")
        finally:
            for process in reversed(processes):
                stop_process_tree(process)
        log = self.root / "warm-state" / "worker.log"
        spans = supernode_spans(self.root / "warm-state" / "supernode.log")
        report = json.loads((self.root / "runs" / "overhead" / "report.json").read_text())
        return {
            "worker_start_s": worker_start,
            "supernode_train": [seconds for kind, seconds in spans if kind == "train"],
            "round_s": [float(row["duration_s"]) for row in report["rounds"]],
            "tasks": logged_events(log, "warm_worker.handled"),
            "compute": logged_seconds(log, "hospital.trained", "local_seconds"),
        }


def per_round(tasks: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The worker's tasks grouped into rounds (each ends with its train task's evaluation)."""
    rounds: list[dict[str, float]] = []
    current: dict[str, float] = {}
    for task in tasks:
        kind = task["message_type"]
        current[kind] = current.get(kind, 0.0) + float(task["total_seconds"])
        if kind == "train":
            for part in ("queued", "pull", "handler", "push"):
                current[f"train_{part}"] = float(task[f"{part}_seconds"])
        if kind == "evaluate":
            if "train" in current:  # not the run's initial evaluation
                rounds.append(current)
            current = {}
    return rounds


def measure(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Cold rounds (a process per message), then a warm deployed run of the same experiment."""
    with tempfile.TemporaryDirectory(prefix="ro-") as temporary:
        root = Path(temporary)
        if model != "tiny":  # its identity record is as temporary as the model
            os.environ["FEDLLM_CACHE_DIR"] = str(root / "cache")
        name = gpt2_100m(root / "gpt2-100m") if model == "gpt2-100m" else "tiny"
        bench = Bench(root, name, args)
        cold_totals, cold_compute = bench.cold()
        warm = bench.warm()
    rounds = per_round(warm["tasks"])
    return {
        "model": model,
        "parameters": bench.parameters,
        "worker_start_s": warm["worker_start_s"],
        "totals": {
            "cold": cold_totals,
            "warm": [r["train"] for r in rounds],
            "warm, at the SuperNode": warm["supernode_train"],
        },
        "compute": {
            "cold": cold_compute,
            "warm": warm["compute"],
            "warm, at the SuperNode": warm["compute"],
        },
        "round_s": warm["round_s"],
        "warm_rounds": rounds,
    }


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    """Round 1 and the mean of later rounds, per mode."""
    rows = []
    for mode in result["totals"]:
        totals, compute = result["totals"][mode], result["compute"][mode]
        if not totals:  # a SuperNode whose log has no timestamps (Flower's own, unsized)
            continue
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
                f"{100 * mean_overhead / mean_compute:.1f}%",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per sequence")
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
        f"\nrounds {args.rounds}, local_steps {args.local_steps}, batch {args.batch_size} x "
        f"{args.max_length} tokens, DP-SGD; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for result in results:
        later = slice(1, None) if args.rounds > 1 else slice(0, None)
        rounds = result["warm_rounds"][later]
        compute = statistics.mean(result["compute"]["warm"][later])

        def mean(key: str, rounds: list[dict[str, float]] = rounds) -> float:
            return statistics.mean(r.get(key, 0.0) for r in rounds)

        print(
            f"{result['model']}: hospital start ready after {result['worker_start_s']:.1f} s; "
            f"warm later rounds, train message: {mean('train_queued'):.2f} s queued until the "
            f"worker claimed it, {mean('train_pull'):.2f} s pulling it, "
            f"{mean('train_handler'):.2f} s in the handler (compute {compute:.2f} s), "
            f"{mean('train_push'):.2f} s pushing the reply and result; the round's other "
            f"messages: query {mean('query'):.2f} s, evaluate {mean('evaluate'):.2f} s; "
            f"whole rounds at the researcher {statistics.mean(result['round_s'][later]):.2f} s"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
