"""What GNMax consensus buys at each noise level: ε per answer next to how often it picks the
candidate most hospitals voted for, with few and with many voters, in one run.

    .venv/bin/python benchmarks/consensus_utility.py [--draws 20000] [--max-tokens 32]

Each row fixes the vote noise σ; ε is the router's cost of one answer of ``max_tokens`` tokens
at δ = 1e-6 (PLD); the win rates come from running ``ConsensusMechanism.decide`` on a fixed
vote (4 of 5 hospitals, or 20 of 25, for candidate 0 among 8; uniform guessing wins 1/8).
"""

from __future__ import annotations

import argparse

import numpy as np

from fedllm.privacy.consensus import ConsensusMechanism, noise_for_epsilon

CANDIDATES = 8
DELTA = 1e-6
VOTES = {"5 voters (4 to 1)": [0] * 4 + [1], "25 voters (20 to 5)": [0] * 20 + [1] * 5}


def win_rate(mechanism: ConsensusMechanism, votes: list[int], draws: int, seed: int) -> float:
    """Share of draws in which the noisy argmax is the majority candidate 0."""
    rng = np.random.default_rng(seed)
    wins = sum(mechanism.decide(votes, CANDIDATES, rng).index == 0 for _ in range(draws))
    return wins / draws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20_000)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    sigmas = [1.0, 2.0, 4.0, 8.0, noise_for_epsilon(1.0, args.max_tokens, DELTA)]
    header = ["σ", f"ε per {args.max_tokens}-token answer", *(f"P(majority), {k}" for k in VOTES)]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for sigma in sigmas:
        mechanism = ConsensusMechanism(vote_noise_std=sigma)
        cost = mechanism.epsilon_cost(args.max_tokens, DELTA)
        rates = [win_rate(mechanism, votes, args.draws, seed=7) for votes in VOTES.values()]
        cells = [f"{sigma:.1f}", f"{cost:.3g}", *(f"{rate:.2f}" for rate in rates)]
        print("| " + " | ".join(cells) + " |")
    print(f"\nuniform guessing: {1 / CANDIDATES:.3f}; δ = {DELTA}; {args.draws} draws per cell")


if __name__ == "__main__":
    main()
