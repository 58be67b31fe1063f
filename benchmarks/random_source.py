"""What the cryptographically secure noise source costs: ``secure`` over ``fast``, side by side.

Two measurements, each alternating the sources so that drift in machine load hits both alike:
drawing Gaussian noise of a given size (the work DP-SGD adds per step, per parameter), and a
whole DP-SGD step of the quick-start model through fedllm's training loop, where the noise is
one part among the forward pass, per-sample gradients and clipping. Run:

    .venv/bin/python benchmarks/random_source.py [--trials 5] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from dp_overhead import CASES, time_steps

from fedllm.privacy.randomness import fresh_stream
from fedllm.telemetry.logging import quiet_third_party_output
from fedllm.training.local import DpSgdSettings

NOISE_SIZES = (10_000, 1_000_000, 10_000_000)


def draw_seconds(source: str, size: int) -> float:
    """Seconds to draw ``size`` Gaussians from a fresh stream of ``source``."""
    stream = fresh_stream(source)
    started = time.perf_counter()
    stream.normal((size,), 1.0, device=torch.device("cpu"), dtype=torch.float32)
    return time.perf_counter() - started


def ratio(trials: int, measure) -> tuple[float, float, float]:
    """Median fast and secure timings over alternating trials, and secure / fast."""
    fast, secure = [], []
    for _ in range(trials):
        fast.append(measure("fast"))
        secure.append(measure("secure"))
    f, s = statistics.median(fast), statistics.median(secure)
    return f, s, s / f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    quiet_third_party_output()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__},"
        f" {torch.get_num_threads()} threads"
    )
    print(f"command: python benchmarks/random_source.py --trials {args.trials}")
    rows = []
    for size in NOISE_SIZES:
        f, s, r = ratio(args.trials, lambda source, n=size: draw_seconds(source, n))
        rows.append((f"draw {size:,} Gaussians", 1e3 * f, 1e3 * s, r))
    dp = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    case = CASES[0]
    f, s, r = ratio(
        args.trials,
        lambda source: time_steps(case, args.steps, dp, seed=0, stream=fresh_stream(source)),
    )
    rows.append((f"DP-SGD step, {case.name}", 1e3 * f, 1e3 * s, r))
    if args.markdown:
        print("| work | fast ms | secure ms | secure / fast |")
        print("|---|---|---|---|")
        for name, fast, secure, factor in rows:
            print(f"| {name} | {fast:.2f} | {secure:.2f} | {factor:.2f}× |")
        return
    for name, fast, secure, factor in rows:
        print(f"{name:44s} fast {fast:9.2f} ms  secure {secure:9.2f} ms  {factor:.2f}×")


if __name__ == "__main__":
    main()
