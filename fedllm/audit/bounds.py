"""Empirical ε lower bounds with a published guarantee: one training run, or many.

One run (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training run",
Theorem 3.1 with δ): m canaries, each independently included (S_i = +1) or not (S_i = −1)
with probability 1/2; the auditor makes r guesses (abstaining on the rest) and v are right.
If the mechanism is (ε, δ)-DP with respect to each S_i, then

    P[W ≥ v] ≤ β(v) + 2mδ · max_{i=1..v} P[v − i ≤ W' < v] / i,    β(v) = P[W' ≥ v],

with W' ~ Binomial(r, e^ε / (1 + e^ε)). The lower bound is the largest ε whose p-value is
still below 1 − confidence: a mechanism with a smaller ε would make what was observed that
unlikely. With δ = 0 this is the pure-DP statement (W is dominated by the binomial).

Many runs (the classic audit): T independent runs each decide "in" or "out" for one canary;
Clopper–Pearson upper bounds on the false-positive and false-negative rates give
ε ≥ log((1 − δ − FNR) / FPR) (and the symmetric term), at the stated confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

# the bisection stops at this width of ε; far below any figure the audit reports
_EPSILON_TOLERANCE = 1e-6
# beyond this ε every binomial tail is 1 to double precision: nothing larger can be shown
_EPSILON_CEILING = 60.0


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: got {confidence}; expected a number in (0, 1)")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``v`` correct of ``r`` guesses on ``m`` canaries under (ε, δ)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1]; got {epsilon}, {delta}")
    if v == 0:
        return 1.0
    accuracy = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, accuracy))
    if delta == 0.0:
        return min(1.0, tail)
    # P[v - i <= W' < v] for i = 1..v is a running sum of the pmf downwards from v - 1
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, accuracy)
    window = np.cumsum(below) / np.arange(1, v + 1)
    return min(1.0, tail + 2.0 * m * delta * float(window.max()))


def one_run_epsilon(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """Largest ε with p-value < 1 − confidence for ``v`` correct of ``r`` guesses; 0 if none."""
    _check_confidence(confidence)
    alpha = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < alpha:
        if high >= _EPSILON_CEILING:
            return high
        low, high = high, min(2.0 * high, _EPSILON_CEILING)
    while high - low > _EPSILON_TOLERANCE:
        middle = (low + high) / 2.0
        if one_run_p_value(m, r, v, middle, delta) < alpha:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class OneRunAudit:
    """The chosen number of guesses, how many were right, and the bound it gives."""

    canaries: int
    guesses: int
    correct: int
    epsilon: float
    candidates: int


def default_guess_counts(m: int) -> list[int]:
    """Numbers of guesses tried: a few fractions of m, even (half "in", half "out")."""
    fractions = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
    counts = {max(2, 2 * round(f * m / 2)) for f in fractions}
    return sorted(c for c in counts if c <= m)


def audit_one_run(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float,
    guess_counts: Sequence[int] | None = None,
) -> OneRunAudit:
    """Guess "in" for the r/2 highest scores and "out" for the r/2 lowest, for each r tried.

    Trying several r after seeing the scores is a multiple test, so each r is tested at
    (1 − confidence) / (number of r tried) (Bonferroni): the best of them keeps the stated
    confidence.
    """
    _check_confidence(confidence)
    values = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    if values.shape != truth.shape or values.ndim != 1 or len(values) < 2:
        raise ValueError("need one score and one inclusion bit per canary, at least two canaries")
    m = len(values)
    counts = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    per_test = 1.0 - (1.0 - confidence) / len(counts)
    order = np.argsort(values, kind="stable")
    best = OneRunAudit(m, 0, 0, 0.0, len(counts))
    for r in counts:
        half = r // 2
        correct = int(truth[order[m - (r - half) :]].sum() + (~truth[order[:half]]).sum())
        epsilon = one_run_epsilon(m, r, correct, delta, per_test)
        if epsilon > best.epsilon or best.guesses == 0:
            best = OneRunAudit(m, r, correct, epsilon, len(counts))
    return best


def clopper_pearson_upper(failures: int, trials: int, confidence: float) -> float:
    """One-sided Clopper–Pearson upper bound on a rate from ``failures`` of ``trials``."""
    _check_confidence(confidence)
    if not 0 <= failures <= trials or trials == 0:
        raise ValueError(f"need 0 <= failures ({failures}) <= trials ({trials}), trials > 0")
    if failures == trials:
        return 1.0
    return float(stats.beta.ppf(confidence, failures + 1, trials - failures))


def many_run_epsilon(
    false_positives: int,
    negatives: int,
    false_negatives: int,
    positives: int,
    delta: float,
    confidence: float,
) -> float:
    """The classic many-run bound from an attack's errors over independent runs.

    Both rates are bounded at (1 + confidence) / 2 each, so the pair holds at ``confidence``.
    """
    _check_confidence(confidence)
    each = (1.0 + confidence) / 2.0
    fpr = clopper_pearson_upper(false_positives, negatives, each)
    fnr = clopper_pearson_upper(false_negatives, positives, each)
    bounds = [0.0]
    for first, second in ((fnr, fpr), (fpr, fnr)):
        if 1.0 - delta - first > 0.0 and second > 0.0:
            bounds.append(math.log((1.0 - delta - first) / second))
    return max(bounds)


def many_run_audit(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float,
    quantiles: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9),
) -> float:
    """The classic bound of a threshold attack ("in" iff score > t) on pooled canaries.

    The thresholds are the score quantiles given; choosing the best after seeing the scores
    is a multiple test, so each is bounded at (1 − confidence) / (number of thresholds)
    (Bonferroni), as :func:`audit_one_run` does for its guess counts.
    """
    _check_confidence(confidence)
    values = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(included, dtype=bool)
    if values.shape != truth.shape or values.ndim != 1 or truth.all() or not truth.any():
        raise ValueError("need one score per canary, with both included and excluded ones")
    per_test = 1.0 - (1.0 - confidence) / len(quantiles)
    best = 0.0
    for threshold in np.quantile(values, quantiles):
        guessed_in = values > threshold
        best = max(
            best,
            many_run_epsilon(
                int((guessed_in & ~truth).sum()),
                int((~truth).sum()),
                int((~guessed_in & truth).sum()),
                int(truth.sum()),
                delta,
                per_test,
            ),
        )
    return best
