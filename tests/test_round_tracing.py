"""One federated round is one trace: the real strategy, through real rounds, to memory.

The strategy runs its rounds as in tests/test_fault_tolerance.py (Flower's Grid replaced by a
double whose hospitals charge real ledgers and answer as the ClientApp does), with server-side
DP wrapped around it and its recorder carrying a `Tracing` that exports to OpenTelemetry's
in-memory exporter. Each round must be its own trace with selection, every hospital's
training, aggregation and evaluation as children of the round's root span; a hospital whose
training failed has its span marked as an error; and no attribute may carry a metric, a loss,
an ε or anything else a hospital released.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.supercore.task_identity import TaskIdentity
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_fault_tolerance import NAMES, DroppingGrid, RemoteHospital, _config

from fedllm.privacy.server_ledger import ServerLedger
from fedllm.report.run_report import RunReport
from fedllm.strategies.cohort_rounds import RoundLostError
from fedllm.strategies.privacy_aware import PrivacyAwareStrategy
from fedllm.strategies.recorder import RunRecorder
from fedllm.strategies.server_dp import HospitalLevelDpStrategy
from fedllm.telemetry.tracing import Tracing

SERVER_DP = {"mode": "fixed", "noise_multiplier": 1.0, "clip_norm": 0.5}
STEPS = {"federation.selection", "federation.aggregation", "federation.evaluation"}
# every attribute a round trace may carry: the round, counts, hospital names, a reply's success
ALLOWED = {
    "fedllm.round",
    "fedllm.candidates",
    "fedllm.cohort",
    "fedllm.hospital",
    "fedllm.ok",
    "fedllm.replies",
    "fedllm.hospitals",
}


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; give the test one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def _traced_run(tmp_path, memory: InMemorySpanExporter, **behaviour) -> dict:
    """Two rounds of the DP-wrapped strategy, traced to ``memory``; the report."""
    config = _config(server_dp=SERVER_DP)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    hospitals = [
        RemoteHospital(config, node_id, name, f"sqlite:///{tmp_path / 'nodes.db'}", **kind)
        for node_id, name in enumerate(NAMES, start=11)
        for kind in [behaviour.get(name, {})]
    ]
    grid = DroppingGrid(hospitals)
    report = RunReport(tmp_path, config)
    ledger = ServerLedger(f"sqlite:///{tmp_path / 'server.db'}")
    ledger.start_run("t", config.model_dump_json())
    tracing = Tracing(provider, "fedllm.federation")
    recorder = RunRecorder(report, ledger, "t", tmp_path, tracing=tracing)
    strategy = PrivacyAwareStrategy.from_config(
        config, recorder=recorder, run_context={"run-dir": str(tmp_path), "run-id": "t"}
    )
    strategy.query_status(grid)
    wrapped = HospitalLevelDpStrategy.around(strategy, config)
    wrapped.start(grid, ArrayRecord({"w": torch.zeros(3)}), num_rounds=2, timeout=7.5)
    return report.data


def _by_trace(spans: list[ReadableSpan]) -> dict[int, list[ReadableSpan]]:
    traces: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        traces.setdefault(span.context.trace_id, []).append(span)
    return traces


def _released_numbers(report: dict) -> set[float]:
    """Every number the hospitals released or the server computed from them in the report:
    losses, perplexities, ε (per hospital and hospital-level), the server-DP records."""
    numbers: set[float] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, float) and math.isfinite(value):
            numbers.add(value)

    for row in report["rounds"]:
        for key in ("eval_loss", "perplexity", "perplexity_per_hospital", "epsilon", "server_dp"):
            walk(row.get(key))
    walk(report["privacy"])
    return numbers


def test_each_round_is_one_trace_of_its_steps_and_a_failure_is_an_error(tmp_path):
    memory = InMemorySpanExporter()
    report = _traced_run(tmp_path, memory, beta={"fail_in_round": 2})
    spans = list(memory.get_finished_spans())
    traces = _by_trace(spans)
    assert len(traces) == 2
    for server_round, members in zip((1, 2), traces.values(), strict=True):
        (root,) = [s for s in members if s.name == "federation.round"]
        assert root.parent is None
        assert root.attributes["fedllm.round"] == server_round
        children = [s for s in members if s is not root]
        assert all(s.parent.span_id == root.context.span_id for s in children)
        assert {s.name for s in children} == STEPS | {"federation.training"}
        assert sorted(s.name for s in children if s.name in STEPS) == sorted(STEPS)
        training = {
            s.attributes["fedllm.hospital"]: s for s in children if s.name == "federation.training"
        }
        assert sorted(training) == sorted(NAMES)
        for span in children:
            assert root.start_time <= span.start_time <= span.end_time <= root.end_time
        failed = {name for name, span in training.items() if not span.status.is_unset}
        assert failed == ({"beta"} if server_round == 2 else set())
        assert all(training[n].attributes["fedllm.ok"] == (n not in failed) for n in NAMES)
        (aggregation,) = [s for s in children if s.name == "federation.aggregation"]
        assert aggregation.attributes["fedllm.replies"] == 3 - len(failed)
    assert report["rounds"][1]["failed"] == ["beta"]
    # the wrapper released both rounds under server-side DP and the report says so
    assert all("server_dp" in row for row in report["rounds"])
    assert report["privacy"]["server_side"]["rounds"] == 2

    # losses, perplexities and ε were there to leak (none of them a whole number) ...
    released = {x for x in _released_numbers(report) if not x.is_integer()}
    assert len(released) > 5
    # ... and no attribute carries one: only rounds and counts (≤ 3 here), names and flags
    for span in spans:
        assert set(span.attributes) <= ALLOWED, span.name
        for value in span.attributes.values():
            assert not isinstance(value, float)
            assert value not in released
            assert isinstance(value, bool) or value in NAMES or 0 <= value <= len(NAMES)


def test_a_round_that_cannot_be_held_ends_its_trace_as_an_error(tmp_path):
    """Every hospital charges round 1 and dies: round 1 is traced with every training span an
    error; round 2 (no status answered) stops the run, and its trace still ends, as an error."""
    memory = InMemorySpanExporter()
    with pytest.raises(RoundLostError):
        _traced_run(tmp_path, memory, **{name: {"drop_in_round": 1} for name in NAMES})
    first, second = _by_trace(list(memory.get_finished_spans())).values()
    training = [s for s in first if s.name == "federation.training"]
    assert len(training) == 3
    assert all(not s.status.is_unset and s.attributes["fedllm.ok"] is False for s in training)
    root = {s.name: s for s in second}
    assert set(root) == {"federation.round", "federation.selection"}
    assert root["federation.round"].attributes["fedllm.round"] == 2
    assert not root["federation.round"].status.is_unset
    assert root["federation.selection"].status.description == "RoundLostError"
