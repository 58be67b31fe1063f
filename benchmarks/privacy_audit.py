"""Power, soundness and runtime of `fedllm privacy audit` on the quick start (configs/default.yaml).

Each repeat is one white-box audit (the DP run and the same federation without DP, fresh
canaries and coins from OS entropy each time); `--broken` adds one audit of a build whose
DP-SGD noise is scaled down 10x (a scratch trainer, never a user setting), which a sound audit
must catch with a bound above the reported ε.

    .venv/bin/python benchmarks/privacy_audit.py --repeats 1 --markdown
"""

from __future__ import annotations

import argparse
import time

import torch

from fedllm.audit.run import run_audit
from fedllm.config.loading import load_config
from fedllm.training.local import DpSgdSettings, train_locally


def _noise_scaled_down_tenfold(model, data, *, dp, **kwargs):
    if dp is not None:
        dp = DpSgdSettings(dp.noise_multiplier / 10, dp.max_grad_norm)
    return train_locally(model, data, dp=dp, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--mode", default="whitebox", choices=("whitebox", "blackbox"))
    parser.add_argument("--broken", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_config(args.config, args.overrides)
    rows = []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        audit = run_audit(config, mode=args.mode, canaries=args.canaries)
        rows.append((f"repeat {repeat + 1}", audit, time.perf_counter() - started))
    if args.broken:
        started = time.perf_counter()
        audit = run_audit(
            config,
            mode=args.mode,
            canaries=args.canaries,
            baseline=False,
            trainer=_noise_scaled_down_tenfold,
        )
        rows.append(("σ / 10 (broken)", audit, time.perf_counter() - started))
    header = (
        "| audit | run | hospital | reported ε | ε lower bound (95%) | ratio | canary AUC "
        "| membership AUC | seconds |"
    )
    print(header if args.markdown else header.replace("|", " "))
    if args.markdown:
        print("|" + " --- |" * 9)
    for label, audit, seconds in rows:
        for run, hospitals in audit["summary"].items():
            for name, row in hospitals.items():
                reported = row["reported_epsilon"]
                cells = [
                    label,
                    "DP" if run == "dp" else "no DP",
                    name,
                    f"{reported:.2f}" if reported else "∞",
                    f"{row['epsilon_lower_bound']:.2f}",
                    f"{row['ratio']:.2f}" if row["ratio"] is not None else "-",
                    f"{row['canary_auc']:.3f}",
                    f"{row['membership_auc']:.3f}",
                    f"{seconds:.0f}",
                ]
                print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
