"""Unit-level privacy accounting: events as data, ε derived by tight accountants."""

from fedllm.privacy.accountant import ACCOUNTANTS, compute_epsilon
from fedllm.privacy.calibration import calibrate_noise_multiplier
from fedllm.privacy.events import (
    GaussianRelease,
    PrivacyEvent,
    SampledGaussianSteps,
    event_from_dict,
    event_to_dict,
    to_dp_event,
)
from fedllm.privacy.node_ledger import BudgetExceededError, NodePrivacyLedger

__all__ = [
    "ACCOUNTANTS",
    "BudgetExceededError",
    "GaussianRelease",
    "NodePrivacyLedger",
    "PrivacyEvent",
    "SampledGaussianSteps",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "event_from_dict",
    "event_to_dict",
    "to_dp_event",
]
