"""Oort's utility of one hospital for the next round, from what the server may use.

Statistical utility from the hospital's last *released* (noised) loss statistic, normalised by
the federation's size; a straggler factor from planned work over *declared* speed (measured
durations depend on Poisson batch sizes, hence on the private data); and an exploration bonus
for hospitals picked rarely. So selection costs no privacy beyond the hospitals' releases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from fedllm.selection.utility import exploration_bonus, statistical_utility, straggler_factor


class Released(Protocol):
    """What the server knows of a hospital (``fedllm.strategies.rounds.HospitalView``)."""

    square_loss_sum: float | None
    sample_size: float | None
    times_selected: int

    @property
    def num_units(self) -> int: ...

    @property
    def speed(self) -> float: ...


def planned_duration(hospital: Released, planned_work: float) -> float:
    """Planned work over declared speed: public, unlike measured (data-dependent) time."""
    return planned_work / max(hospital.speed, 1e-9)


def oort_utility(
    hospital: Released,
    everyone: Sequence[Released],
    server_round: int,
    *,
    planned_work: float,
    loss_clip: float,
    straggler_penalty: float,
    exploration_weight: float,
) -> float:
    """Statistical utility / Σ num_units × straggler factor + exploration bonus.

    Before its first loss statistic a hospital counts as the largest one at loss ``loss_clip``
    (optimistic, so every hospital is measured once).
    """
    statistical = (
        max((h.num_units for h in everyone), default=1) * loss_clip
        if hospital.square_loss_sum is None or hospital.sample_size is None
        else statistical_utility(hospital.num_units, hospital.square_loss_sum, hospital.sample_size)
    )
    scale = sum(h.num_units for h in everyone) or 1
    durations = [planned_duration(h, planned_work) for h in everyone]
    preferred = float(np.median(durations or [0.0]))
    planned = planned_duration(hospital, planned_work)
    factor = straggler_factor(planned, preferred, straggler_penalty)
    bonus = exploration_bonus(server_round, hospital.times_selected, exploration_weight)
    return statistical / scale * factor + bonus
