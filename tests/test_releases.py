"""Gaussian releases of hospital statistics: noise of σ × sensitivity, as the ledger charges."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest

from fedllm.data import ClinicalRecord
from fedllm.federation.hospital import PROFILE_BINS, specialty_counts
from fedllm.privacy.accountant import compute_epsilon
from fedllm.privacy.events import GaussianRelease
from fedllm.privacy.releases import release_counts, release_scalar


def test_scalar_noise_is_sigma_times_sensitivity():
    draws = np.array([release_scalar(10.0, 3.0, 2.0) for _ in range(20_000)])
    assert draws.mean() == pytest.approx(10.0, abs=0.15)
    assert draws.std() == pytest.approx(6.0, rel=0.03)


def test_histogram_noise_is_sigma_per_bin():
    counts = {"a": 5, "b": 0, "c": 7}
    draws = np.array([list(release_counts(counts, 4.0).values()) for _ in range(10_000)])
    assert draws.mean(axis=0) == pytest.approx([5, 0, 7], abs=0.2)
    assert draws.std(axis=0) == pytest.approx([4.0, 4.0, 4.0], rel=0.05)


def test_release_cost_matches_an_independent_gaussian_accountant():
    # one release of a sensitivity-Δ statistic with noise σΔ is a Gaussian mechanism with
    # noise multiplier σ, whatever Δ is; hospital ledgers account it for replace-one
    # neighbours, where one unit leaving and another entering moves it by up to 2Δ
    ours = compute_epsilon([GaussianRelease(20.0, 3)], 1e-5)
    reference = (
        dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
        .compose(dp_accounting.GaussianDpEvent(20.0), 3)
        .get_epsilon(1e-5)
    )
    assert ours == pytest.approx(reference, rel=1e-2)
    assert ours == pytest.approx(dp_accounting.get_epsilon_gaussian(10.0 / 3**0.5, 1e-5), rel=1e-2)


def test_replacing_one_patient_moves_the_histogram_by_at_most_the_charged_sensitivity():
    records = [
        ClinicalRecord(f"t{i}", "cardiology" if i % 2 else "oncology", f"p{i}") for i in range(9)
    ]
    replaced = [*records[:-1], ClinicalRecord("new", "neurology", "p-new")]
    before = np.array(list(specialty_counts(records, "patient").values()), dtype=float)
    after = np.array(list(specialty_counts(replaced, "patient").values()), dtype=float)
    # √2 in add/remove units, within the 2 that a replace-one Gaussian of multiplier σ charges
    assert np.linalg.norm(after - before) == pytest.approx(2**0.5)


def test_profile_counts_each_patient_once_under_patient_level_dp():
    records = [
        ClinicalRecord("x", "cardiology", "p1"),
        ClinicalRecord("y", "cardiology", "p1"),
        ClinicalRecord("z", "oncology", "p2"),
        ClinicalRecord("w", "not-a-specialty", "p3"),
    ]
    by_record = specialty_counts(records, "record")
    by_patient = specialty_counts(records, "patient")
    assert set(by_record) == set(PROFILE_BINS)
    assert (by_record["cardiology"], by_record["oncology"], by_record["unknown"]) == (2, 1, 1)
    assert (by_patient["cardiology"], by_patient["oncology"], by_patient["unknown"]) == (1, 1, 1)
