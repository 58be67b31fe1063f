"""Distributed tracing through real servers: a TLS router and two hospital nodes on loopback,
each exporting spans to an in-memory exporter and, over OTLP/HTTP, to a real receiver.

One plain and one consensus request must each be one trace from the router's server span to
the nodes' spans (the W3C traceparent crosses the hop), with a span per step, and no span may
carry the prompt, the answer, the bearer token or the password.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from router_helpers import DELTA, PASSWORD, bearer, login, make_credentials, router_config

from fedllm.config.loading import ConfigError
from fedllm.privacy.node_ledger import NodePrivacyLedger
from fedllm.security.users import Role
from fedllm.serving.node.app import create_node_app
from fedllm.serving.node.backends import ConstantBackend
from fedllm.serving.node.config import (
    NodeConsensusConfig,
    NodeLedgerConfig,
    NodeServerConfig,
    validate_node_config,
)
from fedllm.serving.node.server import BackgroundServer
from fedllm.serving.router import create_router_app
from fedllm.telemetry.tracing import (
    DISABLED,
    RoundTracing,
    Tracing,
    TracingConfig,
    trace_headers,
)

PLAIN_PROMPT = "patient Jane Roe, 54, chest pain radiating to the left arm since 3am"
CONSENSUS_PROMPT = "patient John Doe, 61, troponin 2.3 ng/mL: next step?"
REPLY = "administer aspirin and obtain a twelve lead electrocardiogram promptly"
CONSENSUS_TOKENS = 3


class _OtlpReceiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP traces endpoint: keeps every POSTed body (protobuf) for the test."""

    bodies: list[bytes]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/v1/traces":
            self.server.bodies.append(body)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        return None


@pytest.fixture(scope="module")
def otlp() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OtlpReceiver)
    server.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _endpoint(otlp: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{otlp.server_address[1]}"


def _node(directory: Path, node_id: str, tracing: dict[str, Any] | None) -> Any:
    """A hospital node (ConstantBackend, real SQLite ledger) with the given tracing section."""
    hospital = f"hospital-{node_id}"
    url = f"sqlite:///{directory / f'{hospital}-ledger.db'}"
    config = NodeServerConfig(
        node_id=node_id,
        hospital_id=hospital,
        backend="constant",
        ledger=NodeLedgerConfig(url=url, epsilon_cap=1000.0, delta=DELTA),
        consensus=NodeConsensusConfig(insecure_loopback=True),
        tracing=tracing,
    )
    ledger = NodePrivacyLedger(url, hospital, epsilon_cap=1000.0, delta=DELTA)
    return create_node_app(config, ConstantBackend(REPLY), ledger)


@pytest.fixture(scope="module")
def traced(tmp_path_factory, otlp) -> Iterator[dict[str, Any]]:
    """Router and two nodes with tracing on; one plain and one consensus request sent."""
    directory = tmp_path_factory.mktemp("tracing")
    creds = make_credentials(directory, {"alice": (Role.CLINICIAN, "cardiology")})
    memory = InMemorySpanExporter()
    endpoint = _endpoint(otlp)
    apps = [
        _node(directory, name, {"otlp_endpoint": endpoint, "service_name": f"fedllm-{name}"})
        for name in ("node-a", "node-b")
    ]
    for app in apps:
        app.state.tracing.provider.add_span_processor(SimpleSpanProcessor(memory))
    with BackgroundServer(apps[0]) as node_a, BackgroundServer(apps[1]) as node_b:
        config = router_config(
            creds,
            [("node-a", node_a.url), ("node-b", node_b.url)],
            tracing={"otlp_endpoint": endpoint},
            cache={"max_entries": 0},
        )
        router_app = create_router_app(config)
        tracing = router_app.state.router.tracing
        tracing.provider.add_span_processor(SimpleSpanProcessor(memory))
        with (
            BackgroundServer(
                router_app,
                ssl_certfile=str(creds.consortium.router_cert),
                ssl_keyfile=str(creds.consortium.router_key),
            ) as router,
            httpx.Client(base_url=router.url, verify=creds.client_ssl, timeout=30) as client,
        ):
            token = login(client, "alice")
            plain = client.post(
                "/v1/inference",
                json={"prompt": PLAIN_PROMPT, "max_tokens": 64},
                headers=bearer(token),
            )
            assert plain.status_code == 200, plain.text
            consensus = client.post(
                "/v1/inference",
                json={
                    "prompt": CONSENSUS_PROMPT,
                    "max_tokens": CONSENSUS_TOKENS,
                    "require_consensus": True,
                },
                headers=bearer(token),
            )
            assert consensus.status_code == 200, consensus.text
            # server spans end once their response is sent: wait until every one is in
            _wait_for(memory, lambda spans: _count(spans, "POST /v1/inference") == 3)
            _wait_for(memory, lambda spans: _count(spans, "POST /v1/consensus/decode") == 2)
            for provider in [tracing.provider, *(app.state.tracing.provider for app in apps)]:
                provider.force_flush()
            yield {
                "memory": memory,
                "otlp": otlp,
                "token": token,
                "plain": plain.json(),
                "consensus": consensus.json(),
            }
    for app in apps:
        app.state.tracing.shutdown()


def _count(spans: tuple[ReadableSpan, ...], name: str) -> int:
    return sum(1 for span in spans if span.name == name)


def _wait_for(memory: InMemorySpanExporter, ready: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready(memory.get_finished_spans()):
        assert time.monotonic() < deadline, [s.name for s in memory.get_finished_spans()]
        time.sleep(0.02)


def _service(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


def _router_roots(memory: InMemorySpanExporter) -> list[ReadableSpan]:
    spans = memory.get_finished_spans()
    roots = [s for s in spans if s.name == "POST /v1/inference" and _service(s) == "fedllm-router"]
    return sorted(roots, key=lambda span: span.start_time or 0)


def _request_trace(memory: InMemorySpanExporter, index: int) -> list[ReadableSpan]:
    trace_id = _router_roots(memory)[index].context.trace_id
    return [s for s in memory.get_finished_spans() if s.context.trace_id == trace_id]


def test_plain_request_is_one_trace_from_router_to_node(traced):
    memory = traced["memory"]
    spans = _request_trace(memory, 0)
    by_name = {span.name: span for span in spans}
    root = _router_roots(memory)[0]
    assert root.parent is None
    assert root.attributes["http.response.status_code"] == 200
    for name in ("router.auth", "router.route", "router.node_call"):
        assert by_name[name].parent.span_id == root.context.span_id, name
    call = by_name["router.node_call"]
    node_spans = [span for span in spans if _service(span) != "fedllm-router"]
    assert {_service(span) for span in node_spans} == {f"fedllm-{traced['plain']['node_id']}"}
    node_root = next(span for span in node_spans if span.name == "POST /v1/inference")
    # the node continued the router's trace under the router's node call span
    assert node_root.context.trace_id == root.context.trace_id
    assert node_root.parent.span_id == call.context.span_id
    assert node_root.parent.is_remote
    assert by_name["node.generate"].parent.span_id == node_root.context.span_id


def test_consensus_request_traces_every_step_on_router_and_nodes(traced):
    memory = traced["memory"]
    spans = _request_trace(memory, 1)
    router = [span for span in spans if _service(span) == "fedllm-router"]
    names = [span.name for span in router]
    for name in (
        "router.auth",
        "router.route",
        "router.consensus",
        "router.quota.reserve",
        "consensus.open",
        "consensus.decode",
        "router.quota.commit",
    ):
        assert names.count(name) == 1, (name, names)
    assert "router.quota.refund" not in names
    assert names.count("consensus.ballot_round") == CONSENSUS_TOKENS
    assert names.count("consensus.tally") == CONSENSUS_TOKENS
    rounds = sorted(
        s.attributes["fedllm.round"] for s in router if s.name == "consensus.ballot_round"
    )
    assert rounds == list(range(CONSENSUS_TOKENS))
    consensus = next(span for span in router if span.name == "router.consensus")
    assert consensus.attributes["fedllm.epsilon"] == pytest.approx(
        traced["consensus"]["privacy_cost"]
    )
    # each hospital continued this trace: charged once at open, one ballot per round
    for node in ("node-a", "node-b"):
        node_names = [span.name for span in spans if _service(span) == f"fedllm-{node}"]
        assert node_names.count("node.consensus.charge") == 1, (node, node_names)
        assert node_names.count("node.consensus.ballot") == CONSENSUS_TOKENS, (node, node_names)
    call_ids = {span.context.span_id for span in router if span.name == "router.node_call"}
    node_roots = [s for s in spans if _service(s) != "fedllm-router" and s.parent.is_remote]
    assert node_roots
    assert all(span.parent.span_id in call_ids for span in node_roots)


def _values(span: ReadableSpan) -> list[str]:
    """Every string a span exports: name, attributes, events, links, status, resource."""
    values = [span.name, span.status.description or ""]
    mappings = [span.attributes or {}, span.resource.attributes]
    mappings += [event.attributes or {} for event in span.events]
    mappings += [link.attributes or {} for link in span.links]
    for mapping in mappings:
        for value in mapping.values():
            values.extend(str(item) for item in (value if isinstance(value, tuple) else (value,)))
    return values


def test_no_span_carries_prompt_answer_token_or_password(traced):
    spans = traced["memory"].get_finished_spans()
    assert traced["plain"]["response"] == REPLY
    consensus_reply = traced["consensus"]["response"]
    assert len(consensus_reply) >= 5  # "t<id>" words, one per token: long enough to search for
    secrets = {
        "plain prompt": PLAIN_PROMPT,
        "consensus prompt": CONSENSUS_PROMPT,
        "plain answer": REPLY,
        "consensus answer": consensus_reply,
        "bearer token": traced["token"],
        "password": PASSWORD,
        "user name": "alice",
    }
    fragments = {**secrets, "prompt start": PLAIN_PROMPT[:12], "answer start": REPLY[:12]}
    leaks = [
        (span.name, what)
        for span in spans
        for value in _values(span)
        for what, secret in fragments.items()
        if secret in value
    ]
    assert leaks == []
    assert len(spans) > 20


def test_otlp_endpoint_receives_router_and_node_spans(traced):
    otlp = traced["otlp"]
    services: set[str] = set()
    names: set[str] = set()
    for body in list(otlp.bodies):
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope in resource_spans.scope_spans:
                names.update(span.name for span in scope.spans)
    assert {"fedllm-router", "fedllm-node-a", "fedllm-node-b"} <= services
    assert {"router.consensus", "router.node_call", "node.consensus.ballot"} <= names


def test_tracing_off_creates_no_exporter_and_sends_no_traceparent(tmp_path, otlp):
    """A router without ``tracing:`` has no provider; its node calls carry no traceparent, so a
    tracing node starts its own trace."""
    memory = InMemorySpanExporter()
    app = _node(tmp_path, "node-a", {"otlp_endpoint": _endpoint(otlp)})
    app.state.tracing.provider.add_span_processor(SimpleSpanProcessor(memory))
    creds = make_credentials(tmp_path, {"bob": (Role.CLINICIAN, "icu")})
    with BackgroundServer(app) as node:
        router_app = create_router_app(router_config(creds, [("node-a", node.url)]))
        assert router_app.state.router.tracing.provider is None
        assert router_app.state.router.pool.tracing.enabled is False
        assert "TraceMiddleware" not in [m.cls.__name__ for m in router_app.user_middleware]
        with (
            BackgroundServer(
                router_app,
                ssl_certfile=str(creds.consortium.router_cert),
                ssl_keyfile=str(creds.consortium.router_key),
            ) as router,
            httpx.Client(base_url=router.url, verify=creds.client_ssl, timeout=30) as client,
        ):
            answer = client.post(
                "/v1/inference",
                json={"prompt": "q", "max_tokens": 4},
                headers=bearer(login(client, "bob")),
            )
            assert answer.status_code == 200, answer.text
            _wait_for(memory, lambda spans: _count(spans, "POST /v1/inference") == 1)
        app.state.tracing.shutdown()
    node_root = next(s for s in memory.get_finished_spans() if s.name == "POST /v1/inference")
    assert node_root.parent is None
    assert trace_headers() == {}


def test_bad_otlp_endpoint_is_one_config_error():
    raw = {
        "node_id": "n",
        "hospital_id": "h",
        "backend": "constant",
        "tracing": {"otlp_endpoint": "localhost:4318"},
    }
    with pytest.raises(ConfigError, match="otlp_endpoint must be an http"):
        validate_node_config(raw)


def test_documented_tracing_sections_are_valid_config():
    """The one-line `tracing:` sections docs/router.md and docs/serving.md show validate as
    written (router and node configs take the same section)."""
    repo = Path(__file__).resolve().parents[1]
    found = []
    for doc in ("docs/router.md", "docs/serving.md"):
        text = (repo / doc).read_text()
        for snippet in re.findall(r"tracing: \{otlp_endpoint: [^}]*\}", text):
            section = yaml.safe_load(snippet)["tracing"]
            config = TracingConfig.model_validate(section)
            assert config.traces_url == "http://localhost:4318/v1/traces"
            found.append((doc, config.service_name))
    assert ("docs/router.md", "fedllm-router") in found
    assert ("docs/serving.md", "fedllm-node") in found


def test_round_tracing_helper_makes_one_trace_per_round():
    """The helper the server app can call: selection, each hospital's training and aggregation
    are children of the round's span, timed as given."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    rounds = RoundTracing(Tracing(provider, "fedllm.federation"))
    sent = time.time_ns()
    with rounds.round(2) as root:
        with rounds.selection(3):
            pass
        rounds.training("st-mary", sent, sent + 5_000_000, ok=True)
        rounds.training("st-luke", sent, sent + 7_000_000, ok=False)
        with rounds.aggregation(1):
            pass
    spans = {
        span.name + span.attributes.get("fedllm.hospital", ""): span
        for span in memory.get_finished_spans()
    }
    assert set(spans) == {
        "federation.round",
        "federation.selection",
        "federation.trainingst-mary",
        "federation.trainingst-luke",
        "federation.aggregation",
    }
    for span in spans.values():
        assert span.context.trace_id == root.get_span_context().trace_id
        if span.name != "federation.round":
            assert span.parent.span_id == root.get_span_context().span_id
    assert spans["federation.trainingst-luke"].end_time - sent == 7_000_000
    assert not spans["federation.trainingst-luke"].status.is_ok
    assert spans["federation.trainingst-mary"].status.is_unset
    with RoundTracing(DISABLED).round(1) as span:
        assert not span.is_recording()
