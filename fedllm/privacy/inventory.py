"""The release inventory: every key a hospital's Flower replies may carry, and why it may.

A DP guarantee covers what a hospital releases only if every released value is either a DP
mechanism charged to its ledger or public. This table is the single list of what may leave a
hospital through Flower; the ClientApp checks each reply against it before sending
(:func:`check_reply`), so a new metric cannot leave unaccounted, and docs/privacy.md shows the
same table to people (a test keeps the two equal, and a test through a real federation checks
every key the server received).

``*`` as the key stands for every array of an ``ArrayRecord`` (the LoRA tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

ReleaseKind = Literal["dp", "public"]


@dataclass(frozen=True)
class InventoryEntry:
    """One reply key: the message it answers, its record, the key, and how it is released."""

    message: str
    record: str
    key: str
    kind: ReleaseKind
    mechanism: str


def _entries() -> tuple[InventoryEntry, ...]:
    public_ledger = "function of the ledger's events, whose parameters are public"
    rows = [
        ("query", "status", "hospital", "public", "hospital name, from the experiment config"),
        ("query", "status", "hospital-index", "public", "position in the experiment config"),
        ("query", "status", "num-units", "public", "training-set size (replace-one relation)"),
        ("query", "status", "speed", "public", "declared speed, from the experiment config"),
        ("query", "status", "epsilon", "public", public_ledger),
        ("query", "status", "epsilon-next", "public", public_ledger),
        ("query", "status", "epsilon-cap", "public", "the hospital's cap (policy)"),
        ("query", "status", "can-afford", "public", public_ledger),
        ("query", "status", "round-events", "public", "the plan's events (public parameters)"),
        ("query", "status", "profile", "dp", "GaussianRelease(σ_p, purpose=profile)"),
        ("query", "status", "profile-events", "public", "the plan's events (public parameters)"),
        ("train", "arrays", "*", "dp", "SampledGaussianSteps(σ, q, steps): DP-SGD output"),
        ("train", "metrics", "num-examples", "public", "training-set size (replace-one)"),
        ("train", "metrics", "hospital-index", "public", "position in the experiment config"),
        ("train", "metrics", "sample-rate", "public", "q = batch_size / num-units"),
        ("train", "metrics", "round-steps", "public", "training.local_steps"),
        (
            "train",
            "metrics",
            "utility-square-loss-sum",
            "dp",
            "GaussianRelease(σ_u, purpose=utility)",
        ),
        ("train", "metrics", "utility-sample-size", "public", "q_u × num-units"),
        ("train", "metrics", "epsilon", "public", public_ledger),
        ("train", "metrics", "epsilon-cap", "public", "the hospital's cap (policy)"),
        ("train", "metrics", "noise-multiplier", "public", "σ, calibrated from public values"),
        ("train", "metrics", "steps", "public", public_ledger),
        ("train", "metrics", "rounds-participated", "public", public_ledger),
        ("train", "privacy", "events", "public", "the round's events (public parameters)"),
        ("evaluate", "metrics", "hospital-index", "public", "position in the experiment config"),
        ("evaluate", "metrics", "evaluated", "public", "whether the hospital evaluated (policy)"),
        (
            "evaluate",
            "metrics",
            "eval-loss-sum",
            "dp",
            "GaussianRelease(σ_e, purpose=evaluation); exact only in simulation",
        ),
        (
            "evaluate",
            "metrics",
            "eval-count",
            "public",
            "evaluation-set size (dp); token count only in simulation (exact)",
        ),
        ("evaluate", "metrics", "epsilon", "public", public_ledger),
        ("evaluate", "metrics", "epsilon-cap", "public", "the hospital's cap (policy)"),
        ("evaluate", "privacy", "events", "public", "the evaluation's events (public parameters)"),
        ("deliver", "delivery", "hospital", "public", "hospital name, from the experiment config"),
        (
            "deliver",
            "delivery",
            "adapter-sha256",
            "public",
            "the server's own adapter hash, echoed as acknowledgement",
        ),
    ]
    return tuple(InventoryEntry(*row) for row in rows)


RELEASE_INVENTORY: tuple[InventoryEntry, ...] = _entries()


class UndeclaredReleaseError(RuntimeError):
    """A reply would carry a key that the release inventory does not list."""


def allowed_keys(message: str) -> set[tuple[str, str]]:
    """(record, key) pairs a reply to ``message`` may carry."""
    return {(e.record, e.key) for e in RELEASE_INVENTORY if e.message == message}


def reply_keys(records: Mapping[str, Iterable[str]]) -> set[tuple[str, str]]:
    """(record, key) pairs of a reply given as {record name: its keys}; arrays become ``*``."""
    keys: set[tuple[str, str]] = set()
    for record, names in records.items():
        keys |= {(record, "*")} if record == "arrays" else {(record, name) for name in names}
    return keys


def undeclared(message: str, records: Mapping[str, Iterable[str]]) -> list[str]:
    """``record.key`` of every key in the reply that the inventory does not list for it."""
    extra = reply_keys(records) - allowed_keys(message)
    return sorted(f"{record}.{key}" for record, key in extra)


def check_reply(message: str, records: Mapping[str, Iterable[str]]) -> None:
    """Refuse to send a reply carrying anything the release inventory does not list."""
    extra = undeclared(message, records)
    if extra:
        raise UndeclaredReleaseError(
            f"a {message} reply would release {', '.join(extra)}, which the release inventory "
            "(fedllm/privacy/inventory.py, docs/privacy.md) does not list"
        )
