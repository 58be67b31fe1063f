"""PNG plots of a run, drawn from report.json (plus summary.json's baselines for the comparison)
so any finished run can be re-plotted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

BASELINE_STYLES = {
    "centralized": ("tab:red", "centralised, no DP"),
    "federated_no_dp": ("tab:purple", "federated, no DP"),
}


def plot_run(report: dict[str, Any], run_dir: Path) -> list[Path]:
    """Write the perplexity and ε plots next to report.json; returns their paths."""
    if not report["rounds"]:
        return []
    return [
        _plot_perplexity(report, {}, run_dir / "perplexity.png"),
        _plot_epsilon(report, run_dir),
    ]


def plot_baselines(report: dict[str, Any], baselines: dict[str, Any], run_dir: Path) -> Path | None:
    """``comparison.png``: the perplexity plot with each baseline as a dashed line.

    ``fedllm run`` draws it (it runs the baselines); the ServerApp's ``perplexity.png`` stays
    as the ServerApp wrote it. None when the run has no round to plot.
    """
    if not report["rounds"]:
        return None
    return _plot_perplexity(report, baselines, run_dir / "comparison.png")


def _plot_perplexity(report: dict[str, Any], baselines: dict[str, Any], path: Path) -> Path:
    rows = report["rounds"]
    initial = report.get("initial") or {}
    rounds = [0, *[row["round"] for row in rows]] if initial else [row["round"] for row in rows]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    global_values = [row["perplexity"] for row in rows]
    if initial:
        global_values = [initial["perplexity"], *global_values]
    axes.plot(rounds, global_values, marker="o", linewidth=2.5, color="black", label="global")
    for hospital in rows[-1]["perplexity_per_hospital"]:
        values = [row["perplexity_per_hospital"].get(hospital) for row in rows]
        if initial:
            values = [initial["perplexity_per_hospital"].get(hospital), *values]
        axes.plot(rounds, values, marker=".", linewidth=1, alpha=0.7, label=hospital)
    for name, baseline in baselines.items():
        if baseline.get("perplexity") is not None:
            color, label = BASELINE_STYLES.get(name, ("gray", name))
            axes.axhline(baseline["perplexity"], linestyle="--", color=color, label=label)
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel("held-out perplexity (log scale)")
    axes.set_title(f"Perplexity per round — {report['config']['run']['name']}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_epsilon(report: dict[str, Any], run_dir: Path) -> Path:
    rows = report["rounds"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    hospitals = sorted({name for row in rows for name in row["epsilon"]})
    rounds = [0, *[row["round"] for row in rows]]
    for hospital in hospitals:
        values = [0.0, *[row["epsilon"].get(hospital) for row in rows]]
        line = axes.plot(rounds, values, marker="o", label=hospital)[0]
        cap = (report["privacy"]["hospitals"].get(hospital) or {}).get("epsilon_cap")
        if cap is not None:
            axes.axhline(cap, linestyle=":", color=line.get_color(), linewidth=1)
    privacy = report["privacy"]
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel(f"cumulative ε (δ={privacy['delta']}, {privacy['accountant']})")
    axes.set_title("Privacy spent per hospital (dotted: cap)")
    axes.grid(alpha=0.3)
    if hospitals:
        axes.legend(fontsize=8)
    path = run_dir / "epsilon.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
