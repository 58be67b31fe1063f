"""Aggregation of hospitals' adapter updates: weighted, unbiased, robust and server-side DP."""

from fedllm.aggregation.rules import (
    AdapterState,
    apply_delta,
    coordinate_median,
    inclusion_weights,
    trimmed_mean,
    update_delta,
    weighted_mean,
)
from fedllm.aggregation.server_dp import (
    SERVER_DP_MODES,
    ServerDpConfig,
    ServerSideDp,
    clip_delta,
    global_norm,
    server_dp_event,
)

__all__ = [
    "SERVER_DP_MODES",
    "AdapterState",
    "ServerDpConfig",
    "ServerSideDp",
    "apply_delta",
    "clip_delta",
    "coordinate_median",
    "global_norm",
    "inclusion_weights",
    "server_dp_event",
    "trimmed_mean",
    "update_delta",
    "weighted_mean",
]
