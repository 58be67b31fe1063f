"""Simulated wall clock to a target perplexity: random FedAvg vs Oort-style vs fedllm's default.

Eight heterogeneous hospitals (10× spread in speed and data size, non-IID specialty mixes,
different ε caps) run the same federation, same seeds, under three strategies through the real
Flower simulation runtime. Each round's simulated wall clock is the slowest selected
hospital's compute time, ``local_steps × batch_size / speed`` work units (the round waits for
its straggler), so the comparison does not depend on this machine's load. The target is the
best perplexity that *every* strategy reaches, and the speed-up is random's time over ours.

    .venv/bin/python benchmarks/time_to_accuracy.py [--rounds 10] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from fedllm.config import ExperimentConfig, dump_config, validate_config
from fedllm.federation.experiment import APP_ROOT, EXPERIMENT, experiment_json
from fedllm.federation.launcher import SimulationResources, local_superlink, run_app
from fedllm.models.loading import resolve_model_path
from fedllm.report.run_report import read_report_json
from fedllm.telemetry.logging import quiet_third_party_output

STRATEGIES = {
    "random FedAvg": {"selection": "random", "aggregation": "weighted"},
    "Oort-style": {"selection": "oort", "aggregation": "weighted"},
    "fedllm default (quantum + inclusion-weighted)": {
        "selection": "quantum",
        "aggregation": "inclusion-weighted",
    },
}

HOSPITALS = [
    {
        "name": "metro",
        "data_size": 1500,
        "speed": 2.0,
        "epsilon_cap": 10.0,
        "specialty_mix": {"emergency": 0.5, "cardiology": 0.5},
    },
    {
        "name": "heart",
        "data_size": 1200,
        "speed": 1.5,
        "epsilon_cap": 10.0,
        "specialty_mix": {"cardiology": 0.9, "emergency": 0.1},
    },
    {
        "name": "cancer",
        "data_size": 1000,
        "speed": 1.0,
        "epsilon_cap": 6.0,
        "specialty_mix": {"oncology": 0.9, "endocrinology": 0.1},
    },
    {
        "name": "children",
        "data_size": 800,
        "speed": 1.0,
        "epsilon_cap": 10.0,
        "specialty_mix": {"pediatrics": 0.9, "emergency": 0.1},
    },
    {
        "name": "neuro",
        "data_size": 600,
        "speed": 0.6,
        "epsilon_cap": 8.0,
        "specialty_mix": {"neurology": 0.9, "emergency": 0.1},
    },
    {
        "name": "diabetes",
        "data_size": 500,
        "speed": 0.5,
        "epsilon_cap": 8.0,
        "specialty_mix": {"endocrinology": 0.9, "cardiology": 0.1},
    },
    {
        "name": "rural-east",
        "data_size": 200,
        "speed": 0.2,
        "epsilon_cap": 4.0,
        "specialty_mix": {"emergency": 0.6, "pediatrics": 0.4},
    },
    {
        "name": "rural-west",
        "data_size": 150,
        "speed": 0.2,
        "epsilon_cap": 4.0,
        "specialty_mix": {"emergency": 0.6, "cardiology": 0.4},
    },
]


def experiment(rounds: int, strategy: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    return {
        "run": {"name": "tta", "seed": 5, "rounds": rounds, "output_dir": str(output_dir)},
        "federation": {"num_hospitals": 8, "cohort_size": 3, "hospitals": HOSPITALS},
        "model": {"name": "tiny", "max_seq_length": 64, "lora": {"r": 4, "alpha": 8.0}},
        "training": {"local_steps": 8, "batch_size": 32, "learning_rate": 0.01},
        "privacy": {"target_epsilon": 6.0, "planned_rounds": rounds, "delta": 1e-5},
        # exact held-out perplexity: this simulation generated the data (labelled as such)
        "evaluation": {"baselines": [], "max_eval_sequences": 128, "release": "exact"},
        "strategy": strategy,
    }


def simulated_clock(report: dict[str, Any]) -> list[float]:
    """Cumulative simulated seconds at the end of each round."""
    speeds = {h["name"]: h["speed"] for h in report["config"]["federation"]["hospitals"]}
    training = report["config"]["training"]
    work = training["local_steps"] * training["batch_size"]
    clock, elapsed = [], 0.0
    for row in report["rounds"]:
        elapsed += max((work / speeds[name] for name in row["selected"]), default=0.0)
        clock.append(elapsed)
    return clock


def time_to(target: float, report: dict[str, Any]) -> float | None:
    for elapsed, row in zip(simulated_clock(report), report["rounds"], strict=True):
        if row["perplexity"] is not None and row["perplexity"] <= target:
            return elapsed
    return None


def simulate(config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """One simulated federation on a private SuperLink, as `fedllm run` starts it; its report.

    Built from the launcher, not the CLI: a benchmark sits on the library like any other caller.
    """
    dump_config(config, run_dir / "config.yaml")
    resolve_model_path(config.model)  # build the base model once, before hospitals race for it
    flwr_home, log_path = run_dir / ".flwr", run_dir / "flower.log"
    run_config = {EXPERIMENT: experiment_json(config), "run-dir": str(run_dir)}
    resources = SimulationResources(num_supernodes=config.federation.num_hospitals)
    with local_superlink(flwr_home, log_path):
        run_app(APP_ROOT, flwr_home, run_config, resources, log_path)
    return read_report_json(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    quiet_third_party_output()
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores")
    print(f"command: python benchmarks/time_to_accuracy.py --rounds {args.rounds}")
    reports = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, strategy in STRATEGIES.items():
            config = validate_config(experiment(args.rounds, strategy, Path(scratch) / label[:6]))
            run_dir = Path(scratch) / label[:6] / "tta"
            run_dir.mkdir(parents=True)
            reports[label] = simulate(config, run_dir)
    target = max(min(r["perplexity"] for r in rep["rounds"]) for rep in reports.values())
    times = {label: time_to(target, rep) for label, rep in reports.items()}
    random_time = times["random FedAvg"]
    print(f"target perplexity (best reached by every strategy): {target:.3f}")
    if args.markdown:
        print("| strategy | final ppl | sim. time to target | speed-up vs random | max ε / cap |")
        print("|---|---|---|---|---|")
    for label, report in reports.items():
        over = [
            f"{name} {state['epsilon']:.2f}/{state['epsilon_cap']:.2f}"
            for name, state in report["privacy"]["hospitals"].items()
            if state["epsilon"] > state["epsilon_cap"] + 1e-9
        ]
        worst = max(
            state["epsilon"] / state["epsilon_cap"]
            for state in report["privacy"]["hospitals"].values()
        )
        speedup = random_time / times[label] if times[label] else float("nan")
        cells = [
            label,
            f"{report['final']['perplexity']:.3f}",
            f"{times[label]:.0f}",
            f"{speedup:.2f}×",
            f"{worst:.3f}" + (f" OVER: {', '.join(over)}" if over else ""),
        ]
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
