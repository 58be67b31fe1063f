"""Unit-level privacy accounting: events as data, ε derived by tight accountants.

The names below are imported on first use: ``fedllm privacy epsilon`` needs the accountant
alone, and importing the ledger would add SQLAlchemy and the encryption stack to every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_SOURCES = {
    "ACCOUNTANTS": "fedllm.privacy.accountant",
    "compute_epsilon": "fedllm.privacy.accountant",
    "calibrate_noise_multiplier": "fedllm.privacy.calibration",
    "GaussianRelease": "fedllm.privacy.events",
    "PrivacyEvent": "fedllm.privacy.events",
    "SampledGaussianSteps": "fedllm.privacy.events",
    "event_from_dict": "fedllm.privacy.events",
    "event_to_dict": "fedllm.privacy.events",
    "to_dp_event": "fedllm.privacy.events",
    "BudgetExceededError": "fedllm.privacy.node_ledger",
    "NodePrivacyLedger": "fedllm.privacy.node_ledger",
}

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


def __getattr__(name: str) -> Any:
    """Import the submodule that defines `name` the first time someone asks for it."""
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value
    return value
