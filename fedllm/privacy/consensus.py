"""Differentially private consensus across hospitals: GNMax with each hospital's noise its own.

A ``require_consensus`` answer asks several hospitals' *local* models (not covered by the DP
guarantee of the global model) which next token to emit. Every token is chosen by PATE's
Gaussian NoisyMax (GNMax), with the noise added where the data is:

1. The candidates are the top-k next tokens of the DP-trained *global* model. That model is
   already accounted for, so choosing candidates is post-processing: it costs 0 ε and the
   candidate set does not depend on any hospital's local data.
2. Each participating hospital's node votes for one candidate with its local model and releases
   only a **noisy ballot**: the one-hot vector of its vote plus independent N(0, σ²) on every
   candidate (:meth:`ConsensusMechanism.ballot`). The raw vote never leaves the hospital.
3. The router adds the ballots up and emits the argmax (:meth:`ConsensusMechanism.tally`).

One hospital's data can at most move its own vote from one candidate to another: its ballot's
mean changes by -1 in one entry and +1 in another, an L2 sensitivity of √2. Each ballot is
therefore a Gaussian mechanism with noise multiplier σ/√2 in sensitivity-1 units, and that is
the guarantee each hospital holds against everyone, the router included. The bound is
hospital-level (any change to a hospital's entire dataset), hence also record-level.

The price of not trusting the router: the sum of n ballots carries noise of std σ√n instead of
the σ a trusted aggregator would add once (benchmarks/consensus_utility.py measures it).

An answer of up to ``max_tokens`` tokens is charged ``max_tokens`` such mechanisms *before*
the first ballot. Its actual length depends on the noisy outputs (when EOS wins), but charging
the maximum keeps the cost fixed in advance, so no privacy odometer (a bound on an adaptively
chosen number of mechanisms) is needed and a hospital can refuse an answer up front.

Everything this module returns about a decision is computed from the noisy ballots only, so
releasing it (the chosen token, a confidence score, a consensus flag) is post-processing too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import dp_accounting
import numpy as np

from fedllm.privacy.accountant import check_accountant, check_delta, compute_epsilon
from fedllm.privacy.events import GaussianRelease

# One hospital moves one vote from one candidate to another: ‖(-1, +1)‖₂ = √2.
VOTE_SENSITIVITY = math.sqrt(2)

# noise_for_epsilon returns a σ that is never more than this fraction noisier than needed.
CALIBRATION_RELATIVE_TOLERANCE = 1e-4

# Per-answer costs are looked up on every consensus request; the few (σ, max_tokens, δ,
# accountant) combinations a router uses are kept.
_COST_CACHE_SIZE = 4096

# Galloping step for bracketing σ around the analytic Gaussian estimate (squared on each miss).
_BRACKET_STEP = 1.01

# Accountants whose answer for a homogeneous Gaussian composition is an upper bound on the exact
# (analytic) ε: for them the exact value is charged, computed in microseconds (see _epsilon_cost).
_EXACT_GAUSSIAN_ACCOUNTANTS = frozenset({"pld", "prv"})


def _check_finite(name: str, value: object) -> float:
    """Return `value` as a float, rejecting bools, non-numbers, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_max_tokens(max_tokens: object) -> int:
    """Return `max_tokens` as an int, rejecting anything that is not an integer >= 1."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, Integral) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    return int(max_tokens)


@dataclass(frozen=True)
class TokenDecision:
    """The noisy outcome of one token's vote; every field is derived from noisy counts only.

    ``index`` is the chosen candidate's position, ``noisy_top_fraction`` its noisy count divided
    by the number of voters (clipped to [0, 1]) and ``confident`` whether that fraction reached
    the mechanism's threshold.
    """

    index: int
    noisy_top_fraction: float
    confident: bool


@dataclass(frozen=True)
class ConsensusMechanism:
    """GNMax in which every hospital adds N(0, ``vote_noise_std``²) to its own ballot.

    ``threshold`` is the fraction of voters the winning noisy total must reach for a token to
    count as agreed on; it shapes the reported confidence, not the privacy cost.
    """

    vote_noise_std: float
    threshold: float = 0.5

    def __post_init__(self) -> None:
        """Validate eagerly so a misconfigured router or node fails at start-up, not mid-answer."""
        if _check_finite("vote_noise_std", self.vote_noise_std) <= 0:
            raise ValueError(f"vote_noise_std must be > 0, got {self.vote_noise_std!r}")
        if not 0 < _check_finite("threshold", self.threshold) <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")

    @classmethod
    def from_noise_multiplier(cls, noise_multiplier: float) -> ConsensusMechanism:
        """The mechanism whose ballots have multiplier `noise_multiplier` (σ/√2)."""
        return cls(
            vote_noise_std=_check_finite("noise_multiplier", noise_multiplier) * VOTE_SENSITIVITY
        )

    @property
    def noise_multiplier(self) -> float:
        """σ/√2: the noise in units of the vote histogram's sensitivity."""
        return self.vote_noise_std / VOTE_SENSITIVITY

    def epsilon_cost(self, max_tokens: int, delta: float, accountant: str = "pld") -> float:
        """ε at `delta` of one answer of up to `max_tokens` tokens, for each hospital (cached).

        This is what each participating hospital's ballots cost it, whatever length the answer
        turns out to have, and what the asking user's and department's router quotas are charged.
        """
        count = _check_max_tokens(max_tokens)
        check_delta(delta)
        check_accountant(accountant)
        return _epsilon_cost(self.noise_multiplier, count, float(delta), accountant)

    def ballot(self, vote: int, n_candidates: int, rng: np.random.Generator) -> list[float]:
        """The one release a hospital makes per token: one-hot(`vote`) + N(0, σ²) per candidate.

        `rng` must be unpredictable to everyone outside the hospital (OS entropy): noise that can
        be predicted can be subtracted, and the ballot would then be the raw vote.
        """
        size = _check_candidates(n_candidates)
        if isinstance(vote, bool) or not isinstance(vote, Integral) or not 0 <= vote < size:
            raise ValueError(f"vote {vote!r} is not a candidate index in [0, {size})")
        noisy = rng.normal(0.0, self.vote_noise_std, size=size)
        noisy[int(vote)] += 1.0
        return [float(value) for value in noisy]

    def tally(self, ballots: Sequence[Sequence[float]]) -> TokenDecision:
        """Choose the candidate with the largest sum of noisy `ballots` (one per hospital).

        Post-processing of the ballots: it adds no noise and costs nothing. The sum carries noise
        of std σ·√(number of ballots) around the true vote counts.
        """
        if len(ballots) == 0:
            raise ValueError("at least one ballot is needed")
        size = len(ballots[0])
        _check_candidates(size)
        rows = []
        for ballot in ballots:
            if len(ballot) != size:
                raise ValueError(f"ballots differ in length: {len(ballot)} != {size}")
            rows.append([_check_finite("ballot entry", value) for value in ballot])
        totals = np.asarray(rows, dtype=np.float64).sum(axis=0)
        index = int(np.argmax(totals))
        fraction = float(np.clip(totals[index] / len(ballots), 0.0, 1.0))
        return TokenDecision(
            index=index, noisy_top_fraction=fraction, confident=fraction >= self.threshold
        )


def _check_candidates(n_candidates: object) -> int:
    """Return `n_candidates` as an int, rejecting anything that is not an integer >= 1."""
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, Integral):
        raise ValueError(f"n_candidates must be an integer, got {n_candidates!r}")
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates!r}")
    return int(n_candidates)


def ledger_event(noise_multiplier: float, max_tokens: int) -> GaussianRelease:
    """The consensus votes of one answer as a hospital's (replace-one) ledger records them.

    ``noise_multiplier`` is σ/√2, the vote noise over the histogram's sensitivity √2 (one
    hospital moving its vote), i.e. a sensitivity-1 Gaussian in add/remove units. A
    replace-one accountant reads a Gaussian of multiplier m as having sensitivity 2, so the
    same mechanism is m = 2·σ/√2: the ε is identical, only the units differ.
    """
    return GaussianRelease(2.0 * noise_multiplier, count=max_tokens, purpose="consensus")


@functools.lru_cache(maxsize=_COST_CACHE_SIZE)
def _epsilon_cost(noise_multiplier: float, max_tokens: int, delta: float, accountant: str) -> float:
    """Cached ε of `max_tokens` Gaussian mechanisms with `noise_multiplier`.

    The multiplier already encodes the vote histogram's sensitivity √2 (one hospital moving its
    vote), so each token is a plain sensitivity-1 Gaussian: add/remove units. k Gaussians of
    multiplier m compose to exactly one Gaussian of multiplier m/√k, whose ε has a closed form
    (Balle & Wang 2018, ``dp_accounting.get_epsilon_gaussian``). PLD and PRV approximate that
    same value from above and take up to seconds for small m and large k, which would let a
    burst of requests with new ``max_tokens`` stall the router, so for them the closed form is
    charged. RDP gives a looser bound of its own and is composed as configured.
    """
    if accountant in _EXACT_GAUSSIAN_ACCOUNTANTS:
        return float(
            dp_accounting.get_epsilon_gaussian(noise_multiplier / math.sqrt(max_tokens), delta)
        )
    event = GaussianRelease(noise_multiplier=noise_multiplier, count=max_tokens)
    return compute_epsilon([event], delta, accountant, neighbouring="add-remove")


def summarise(decisions: Sequence[TokenDecision]) -> tuple[bool, float]:
    """``(consensus_reached, confidence_score)`` of an answer's token decisions.

    Consensus is reached when every token was confident; the score is the mean noisy top
    fraction, in [0, 1]. An answer with no decided tokens reached no consensus: (False, 0.0).
    """
    if not decisions:
        return False, 0.0
    reached = all(d.confident for d in decisions)
    score = sum(d.noisy_top_fraction for d in decisions) / len(decisions)
    return reached, float(min(max(score, 0.0), 1.0))


def noise_for_epsilon(
    epsilon: float, max_tokens: int, delta: float, accountant: str = "pld"
) -> float:
    """The smallest vote noise std σ (to 0.01 %) whose per-answer ε is at most `epsilon`.

    The search is a bisection on :meth:`ConsensusMechanism.epsilon_cost` itself, so the
    returned σ is guaranteed to meet the target under the accountant that will charge it. It
    starts from the analytic Gaussian σ (``max_tokens`` Gaussians with multiplier s compose to
    one with s/√max_tokens), so only a handful of accountant evaluations are needed.
    """
    target = _check_finite("epsilon", epsilon)
    if target <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    count = _check_max_tokens(max_tokens)
    check_delta(delta)
    check_accountant(accountant)

    def gap(sigma: float) -> float:
        return ConsensusMechanism(sigma).epsilon_cost(count, delta, accountant) - target

    estimate = dp_accounting.get_sigma_gaussian(target, delta) * math.sqrt(count)
    start = estimate * VOTE_SENSITIVITY
    low, high, step = start, start, _BRACKET_STEP
    if gap(start) > 0:
        while gap(high) > 0:
            low, high, step = high, high * step, step * step
    else:
        while gap(low) <= 0:
            high, low, step = low, low / step, step * step
    while high - low > CALIBRATION_RELATIVE_TOLERANCE * high:
        middle = math.sqrt(low * high)
        if gap(middle) > 0:
            low = middle
        else:
            high = middle
    return high
