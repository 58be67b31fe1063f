"""Oort-style utility and profile redundancy, from released statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedllm.selection.utility import (
    exploration_bonus,
    profile_similarity,
    statistical_utility,
    straggler_factor,
)


def test_statistical_utility_is_size_times_rms_loss():
    # 50 sampled sequences with loss 2 each: Σℓ² = 200, rms = 2, hospital of 1000 -> 2000
    assert statistical_utility(1000, 200.0, 50.0) == pytest.approx(2000.0)
    assert statistical_utility(1000, -5.0, 50.0) == 0.0
    assert statistical_utility(1000, 10.0, 0.0) == 0.0


def test_slow_hospitals_are_penalised_fast_ones_are_not():
    assert straggler_factor(10.0, 20.0, 2.0) == 1.0
    assert straggler_factor(40.0, 20.0, 2.0) == pytest.approx(0.25)
    assert straggler_factor(None, 20.0, 2.0) == 1.0


def test_exploration_bonus_shrinks_with_selection_count():
    bonuses = [exploration_bonus(10, t, 1.0) for t in range(5)]
    assert bonuses == sorted(bonuses, reverse=True)
    assert bonuses[0] == pytest.approx(math.sqrt(math.log(10)))


def test_profile_similarity_is_cosine_with_zero_diagonal():
    profiles = [[10, 0, 0], [5, 0, 0], [0, 3, 4], None, [-1.0, 0.0, 0.0]]
    s = profile_similarity(profiles)
    assert s.shape == (5, 5)
    assert np.allclose(s, s.T)
    assert np.all(np.diag(s) == 0)
    assert s[0, 1] == pytest.approx(1.0)
    assert s[0, 2] == pytest.approx(0.0)
    assert s[1, 2] == pytest.approx(0.0)
    assert np.all(s[3] == 0)
    # negative noised counts are clipped: an all-negative profile carries no similarity
    assert np.all(s[4] == 0)
