"""Power, soundness and runtime of `fedllm privacy audit` on the quick start (configs/default.yaml).

Each repeat is one audit (`--mode`, white-box by default) of the DP run (fresh canaries and
coins from OS entropy each time), the first also of the same federation without DP (power;
every repeat with `--no-dp-every-repeat`); `--broken` adds one
audit of a build whose DP-SGD noise is scaled down 10x (a scratch trainer, never a user
setting), which a sound audit must catch with a bound above the reported ε. `--runs K` makes
each audit a K-run audit (pooled guesses, plus the classic many-run bound); `--workers N`
runs N audits side by side. The last line says whether any DP bound exceeded its reported ε.

    .venv/bin/python benchmarks/privacy_audit.py --repeats 3 --broken --markdown
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context

import torch

from fedllm.audit.run import run_audit
from fedllm.config.loading import load_config
from fedllm.training.local import DpSgdSettings, train_locally


def _noise_scaled_down_tenfold(model, data, *, dp, **kwargs):
    if dp is not None:
        dp = DpSgdSettings(dp.noise_multiplier / 10, dp.max_grad_norm)
    return train_locally(model, data, dp=dp, **kwargs)


def _audit(job: tuple[str, dict], config_path: str, overrides: list[str], threads: int):
    """One audit in its own process: (label, audit.json content, seconds)."""
    torch.set_num_threads(threads)
    label, settings = job
    config = load_config(config_path, overrides)
    started = time.perf_counter()
    audit = run_audit(config, **settings)
    return label, audit, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--canaries", type=int, default=None, help="default: 500 white-box, 32 black-box"
    )
    parser.add_argument("--mode", default="whitebox", choices=("whitebox", "blackbox"))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--broken", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=1, help="audits run side by side (1 torch thread each)"
    )
    parser.add_argument(
        "--no-dp-every-repeat",
        action="store_true",
        help="audit the federation without DP in every repeat, not only the first",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    common = {"mode": args.mode, "canaries": args.canaries, "runs": args.runs}
    # the no-DP baseline (power) in the first repeat or all; every repeat audits the DP run
    jobs = [
        (f"repeat {repeat + 1}", {**common, "baseline": repeat == 0 or args.no_dp_every_repeat})
        for repeat in range(args.repeats)
    ]
    if args.broken:
        jobs.append(
            (
                "σ / 10 (broken)",
                {**common, "baseline": False, "trainer": _noise_scaled_down_tenfold},
            )
        )
    threads = 2 if args.workers == 1 else 1
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        rows = list(
            pool.map(
                partial(_audit, config_path=args.config, overrides=args.overrides, threads=threads),
                jobs,
            )
        )
    header = (
        "| audit | run | hospital | reported ε | ε lower bound (95%) | ratio | many-run ε (95%) "
        "| canary AUC | membership AUC | seconds |"
    )
    print(header if args.markdown else header.replace("|", " "))
    if args.markdown:
        print("|" + " --- |" * 10)
    worst = 0.0
    for label, audit, seconds in rows:
        for run, hospitals in audit["summary"].items():
            for name, row in hospitals.items():
                reported = row["reported_epsilon"]
                many = row.get("many_run_epsilon_lower_bound")
                if run == "dp" and not label.startswith("σ"):
                    worst = max(worst, row["ratio"], (many or 0.0) / reported)
                cells = [
                    label,
                    "DP" if run == "dp" else "no DP",
                    name,
                    f"{reported:.2f}" if reported else "∞",
                    f"{row['epsilon_lower_bound']:.2f}",
                    f"{row['ratio']:.2f}" if row["ratio"] is not None else "-",
                    f"{many:.2f}" if many is not None else "-",
                    f"{row['canary_auc']:.3f}",
                    f"{row['membership_auc']:.3f}",
                    f"{seconds:.0f}",
                ]
                print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))
    if args.repeats:
        verdict = "never exceeded" if worst <= 1.0 else "EXCEEDED"
        print(f"\nDP runs: the bound {verdict} the reported ε (largest ratio {worst:.2f})")


if __name__ == "__main__":
    main()
