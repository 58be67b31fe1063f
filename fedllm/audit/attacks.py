"""Threshold attacks: the area under the ROC curve of a score that separates members.

An attacker who thresholds a score (a canary's projection, a record's negative loss) has a
whole ROC curve of trade-offs; its area is the probability that a random member scores above a
random non-member (ties count half), the Mann–Whitney statistic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def auc(scores: Sequence[float], members: Sequence[bool]) -> float:
    """P(score of a member > score of a non-member), ties counting 1/2; NaN if a class is empty."""
    values = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(members, dtype=bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = stats.rankdata(values)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_curve(scores: Sequence[float], members: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of every threshold, from (0, 0) to (1, 1)."""
    values = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(members, dtype=bool)
    order = np.argsort(-values, kind="stable")
    hits = np.concatenate(([0], np.cumsum(truth[order])))
    misses = np.concatenate(([0], np.cumsum(~truth[order])))
    return misses / max(1, misses[-1]), hits / max(1, hits[-1])


def loss_threshold_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the loss-threshold membership attack (Yeom et al. 2018): low loss means member."""
    scores = np.concatenate((-member_losses, -nonmember_losses))
    members = np.concatenate((np.ones(len(member_losses)), np.zeros(len(nonmember_losses))))
    return auc(scores, members.astype(bool))
