"""What GNMax consensus buys at each noise level, and what noising at the hospitals costs.

    .venv/bin/python benchmarks/consensus_utility.py [--draws 20000] [--max-tokens 32]

Each row fixes σ, the noise each hospital's ballot carries on every candidate; ε is the cost of
one answer of ``max_tokens`` tokens to each hospital (and to the asking user) at δ = 1e-6. For
the same ε per hospital, two designs are run side by side on a fixed vote (4 of 5 hospitals, or
20 of 25, for candidate 0 among 8; uniform guessing wins 1/8):

- **hospital noise** (what fedllm does): every hospital adds N(0, σ²) to its own one-hot ballot
  (``ConsensusMechanism.ballot``) and the router sums them (``ConsensusMechanism.tally``), so
  the sum carries noise of std σ·√n and no one, the router included, sees a raw vote;
- **trusted router** (the baseline fedllm no longer uses): hospitals send raw votes and the router
  adds N(0, σ²) once to each count, which needs the router to be trusted with the raw votes.
"""

from __future__ import annotations

import argparse

import numpy as np

from fedllm.privacy.consensus import ConsensusMechanism, noise_for_epsilon

CANDIDATES = 8
DELTA = 1e-6
VOTES = {"5 voters (4 to 1)": [0] * 4 + [1], "25 voters (20 to 5)": [0] * 20 + [1] * 5}


def hospital_noise_win_rate(
    mechanism: ConsensusMechanism, votes: list[int], draws: int, seed: int
) -> float:
    """Share of draws in which the tally of noisy ballots picks the majority candidate 0."""
    rng = np.random.default_rng(seed)
    wins = 0
    for _ in range(draws):
        ballots = [mechanism.ballot(vote, CANDIDATES, rng) for vote in votes]
        wins += mechanism.tally(ballots).index == 0
    return wins / draws


def trusted_router_win_rate(sigma: float, votes: list[int], draws: int, seed: int) -> float:
    """The same, when one N(0, σ²) per candidate is added to the raw counts by the router."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(votes, minlength=CANDIDATES)
    noisy = counts + rng.normal(0.0, sigma, size=(draws, CANDIDATES))
    return float(np.mean(np.argmax(noisy, axis=1) == 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20_000)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    sigmas = [1.0, 2.0, 4.0, 8.0, noise_for_epsilon(1.0, args.max_tokens, DELTA)]
    header = ["σ", f"ε per {args.max_tokens}-token answer"]
    for name in VOTES:
        header += [f"P(majority), {name}, hospital noise", "same, trusted router"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for sigma in sigmas:
        mechanism = ConsensusMechanism(vote_noise_std=sigma)
        cells = [f"{sigma:.1f}", f"{mechanism.epsilon_cost(args.max_tokens, DELTA):.3g}"]
        for votes in VOTES.values():
            cells.append(f"{hospital_noise_win_rate(mechanism, votes, args.draws, 7):.2f}")
            cells.append(f"{trusted_router_win_rate(sigma, votes, args.draws, 7):.2f}")
        print("| " + " | ".join(cells) + " |")
    print(f"\nuniform guessing: {1 / CANDIDATES:.3f}; δ = {DELTA}; {args.draws} draws per cell")


if __name__ == "__main__":
    main()
