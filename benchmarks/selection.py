"""Cohort selection: optimality gap and time of every solver, side by side, in one run.

Part 1, dense instances N ∈ {20, 50, 100, 200}, K = N/5: the gap of each solver to the exact
MILP optimum (HiGHS, time-limited; where it cannot prove optimality the reference is the best
cohort any method found, and the table says how many references are proven). Tabu gets the
default solver's measured time as its timeout on each instance.

Part 2, N = 10,000, K = 100 with sparse similarity (≈15 nearest neighbours each): no exact
reference is feasible, so objectives are compared with the best known; Tabu again gets the
default solver's measured time.

Part 3, the measurement behind the default: path-integral annealing (``sqa-swap``, and the
textbook schedule that ramps the slice coupling up) against its classical limit
(``sa-swap``) on a harder family (flat utility, strong redundancy), at their default budgets.
Run:

    .venv/bin/python benchmarks/selection.py [--quick] [--markdown] [--seeds 5]
        [--parts dense,sparse,annealers]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np

from fedllm.selection import DEFAULT_SOLVER, CohortInstance, solve, synthetic_instance
from fedllm.selection.exact import solve_milp

FAMILY = {"spread": 0.3, "tilt": 2.0, "balance": 1.0}
"""Utility tied to case mix, so the best hospitals are also redundant (greedy is not enough)."""
SOLVERS = (DEFAULT_SOLVER, "sa-swap", "dwave-sa", "dwave-pimc", "tabu", "greedy", "random")
HARD_FAMILY = {"spread": 0.1, "tilt": 0.5, "balance": 1.5}
"""Nearly flat utility and strong redundancy: many near-equal cohorts, greedy 15% off."""
ANNEALERS = {
    "sqa-swap (default)": ("sqa-swap", {}),
    "sqa-swap, J ramped up": ("sqa-swap", {"field_start": 0.3, "field_end": 2e-5}),
    "sqa-swap 4 chains × 4 slices": ("sqa-swap", {"chains": 4, "slices": 4}),
    "sa-swap (no field)": ("sa-swap", {}),
}


def gap(reference: float, value: float) -> float:
    """Optimality gap in percent of the reference objective."""
    return 100.0 * (reference - value) / abs(reference)


def run_solvers(instance: CohortInstance, seed: int) -> dict[str, tuple[float, float]]:
    """Objective and seconds per solver; Tabu's timeout is the default solver's time."""
    results = {}
    for name in SOLVERS:
        options = {}
        if name == "tabu":
            options["timeout"] = max(1, round(1000 * results[DEFAULT_SOLVER][1]))
        result = solve(instance, name, seed=seed, **options)
        results[name] = (result.objective, result.seconds)
    return results


def dense_rows(sizes: Sequence[int], seeds: int, exact_limit: float) -> list[list[str]]:
    """One table row per N: proven references, exact time, then gap/time per solver."""
    rows = []
    for n in sizes:
        gaps: dict[str, list[float]] = {name: [] for name in SOLVERS}
        times: dict[str, list[float]] = {name: [] for name in SOLVERS}
        proven, exact_times = 0, []
        for seed in range(seeds):
            instance = synthetic_instance(n, n // 5, seed=seed, **FAMILY)
            started = time.perf_counter()
            exact = solve_milp(instance, time_limit=exact_limit)
            exact_times.append(time.perf_counter() - started)
            results = run_solvers(instance, seed)
            reference = max(exact.objective, *(value for value, _ in results.values()))
            proven += exact.proven
            for name, (value, seconds) in results.items():
                gaps[name].append(gap(reference, value))
                times[name].append(seconds)
        row = [str(n), str(n // 5), f"{proven}/{seeds}", f"{statistics.median(exact_times):.2f}"]
        for name in SOLVERS:
            milliseconds = 1000 * statistics.median(times[name])
            row.append(f"{statistics.median(gaps[name]):.3f}% / {milliseconds:.0f}")
        rows.append(row)
    return rows


def sparse_rows(seeds: int, long_run: bool) -> list[list[str]]:
    """N = 10,000 sparse: default vs Tabu at the same time, greedy, classical annealing."""
    rows = []
    for seed in range(seeds):
        started = time.perf_counter()
        instance = synthetic_instance(10_000, 100, seed=seed, neighbours=15, **FAMILY)
        build = time.perf_counter() - started
        default = solve(instance, DEFAULT_SOLVER, seed=seed)
        timeout = max(1, round(1000 * default.seconds))
        results = {
            DEFAULT_SOLVER: default,
            "sa-swap": solve(instance, "sa-swap", seed=seed),
            "greedy": solve(instance, "greedy"),
            "tabu": solve(instance, "tabu", seed=seed, timeout=timeout),
        }
        best = max(result.objective for result in results.values())
        if long_run:
            longer = solve(instance, DEFAULT_SOLVER, seed=seed + 1, sweeps=20, max_work=1e9)
            best = max(best, longer.objective)
        for name, result in results.items():
            note = f"timeout {timeout} ms" if name == "tabu" else ""
            rows.append(
                [
                    str(seed),
                    f"{instance.similarity.nnz / instance.n:.1f}",
                    f"{build:.1f}",
                    name,
                    f"{result.objective:.4f}",
                    f"{gap(best, result.objective):.3f}%",
                    f"{result.seconds:.2f}",
                    note,
                ]
            )
    return rows


def annealer_rows(sizes: Sequence[int], seeds: int) -> list[list[str]]:
    """Gap to the best known (all runs plus one long classical run), hits and time."""
    rows = []
    for n in sizes:
        instances = [
            synthetic_instance(n, n // 5, seed=seed, **HARD_FAMILY) for seed in range(seeds)
        ]
        found = {
            label: [
                solve(instance, name, seed=seed, small_exact=False, **options)
                for seed, instance in enumerate(instances)
            ]
            for label, (name, options) in ANNEALERS.items()
        }
        best = [
            max(
                solve(instance, "sa-swap", seed=99, chains=32, sweeps=40, max_work=1e10).objective,
                *(results[seed].objective for results in found.values()),
            )
            for seed, instance in enumerate(instances)
        ]
        for label, results in found.items():
            gaps = [gap(best[seed], result.objective) for seed, result in enumerate(results)]
            hits = sum(value <= 1e-9 for value in gaps)
            rows.append(
                [
                    str(n),
                    label,
                    f"{statistics.median(gaps):.3f}%",
                    f"{statistics.mean(gaps):.3f}%",
                    f"{max(gaps):.3f}%",
                    f"{hits}/{seeds}",
                    f"{1000 * statistics.median(result.seconds for result in results):.0f}",
                ]
            )
    return rows


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """A Markdown table or an aligned plain-text one."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(str(c).rjust(w) for c, w in zip(line, widths, strict=True))
        for line in (headers, *rows)
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run, under a minute")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--seeds", type=int, default=None, help="instances per size")
    parser.add_argument("--parts", default="dense,sparse,annealers", help="comma-separated")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    seeds = args.seeds or (2 if args.quick else 5)
    sizes = (20, 50, 100) if args.quick else (20, 50, 100, 200)
    exact_limit = 2.0 if args.quick else 20.0
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()},"
        f" {os.cpu_count()} logical CPUs, Python {platform.python_version()},"
        f" numpy {np.__version__}"
    )
    print(f"instances: synthetic_instance(N, N // 5, seed, **{FAMILY}), seeds 0..{seeds - 1}")
    print(f"exact: HiGHS MILP, time limit {exact_limit:g} s per instance\n")
    if "dense" in parts:
        headers = ["N", "K", "proven", "exact s", *(f"{name} gap / ms" for name in SOLVERS)]
        print(render(headers, dense_rows(sizes, seeds, exact_limit), args.markdown))
    if "sparse" in parts:
        print("\nN = 10,000, K = 100, sparse (15 nearest neighbours, symmetrised)\n")
        headers = ["seed", "nnz/row", "gen s", "solver", "objective", "gap to best", "s", ""]
        print(render(headers, sparse_rows(1 if args.quick else 2, not args.quick), args.markdown))
    if "annealers" in parts:
        print(f"\nAnnealer choice: synthetic_instance(N, N // 5, seed, **{HARD_FAMILY})\n")
        headers = ["N", "sampler", "median gap", "mean gap", "max gap", "hits", "ms"]
        rows = annealer_rows((100, 200), args.seeds or (5 if args.quick else 20))
        print(render(headers, rows, args.markdown))


if __name__ == "__main__":
    main()
