"""The audit's picture: canary scores of included vs excluded slots, and the attack's ROC curve.

Overlapping histograms are what a sound DP guarantee looks like; separated ones are what the
bound counts. One row per audited hospital, drawn from ``audit.json`` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedllm.audit.attacks import roc_curve

RUN_STYLES = {"dp": ("tab:blue", "DP run"), "no_dp": ("tab:red", "no DP")}


def plot_audit(audit: dict[str, Any], path: Path) -> Path:
    """Write the figure to ``path`` and return it."""
    hospitals = audit["audited"]
    figure, axes = plt.subplots(
        len(hospitals), 2, figsize=(10, 3.6 * len(hospitals)), squeeze=False
    )
    first_run = next(iter(audit["runs"]))
    for row, hospital in enumerate(hospitals):
        shown = audit["runs"][first_run][hospital]
        scores = np.asarray(shown["scores"])
        included = np.asarray(shown["included"], dtype=bool)
        bins = np.histogram_bin_edges(scores, bins=40)
        histogram = axes[row][0]
        histogram.hist(scores[included], bins=bins, alpha=0.6, label="included", color="tab:green")
        histogram.hist(scores[~included], bins=bins, alpha=0.6, label="excluded", color="tab:gray")
        histogram.set_title(f"{hospital}: canary scores ({RUN_STYLES[first_run][1]})")
        histogram.set_xlabel("score")
        histogram.legend()
        curve = axes[row][1]
        for run, results in audit["runs"].items():
            colour, label = RUN_STYLES[run]
            fpr, tpr = roc_curve(results[hospital]["scores"], results[hospital]["included"])
            bound = results[hospital]["epsilon_lower_bound"]
            curve.plot(fpr, tpr, color=colour, label=f"{label}: ε ≥ {bound:.2f}")
        curve.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=1)
        curve.set_xlabel("false-positive rate")
        curve.set_ylabel("true-positive rate")
        curve.set_title(f"{hospital}: ROC of the {audit['mode']} attack")
        curve.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
