"""Distributed tracing with OpenTelemetry: off by default, OTLP/HTTP export when configured.

One ``tracing:`` section (router.yaml, node.yaml, or an experiment YAML for the federated
server's round traces, `RoundTracing`) turns it on::

    tracing: {otlp_endpoint: http://localhost:4318, service_name: fedllm-router}

Each app owns its `Tracing` (its own ``TracerProvider`` and service name, not the process-global
one), so a router and nodes served from one process still report as separate services. When the
section is absent no provider or exporter exists and `Tracing.span` hands back one shared no-op
context manager: a disabled span costs a method call, not an OpenTelemetry context switch.

The trace context crosses process boundaries only as a W3C ``traceparent`` header
(`trace_headers` on the caller, `TraceMiddleware` on the callee); baggage is never propagated.

Span attributes are operational only (routes, node and hospital ids, counts, ε, status codes):
never prompts, answers, tokens, passwords, user names or anything about a patient. Exceptions
are recorded as their type name alone, because an exception message may quote a request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

AttributeValue = str | bool | int | float
_PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT = "traceparent"


class TracingConfig(BaseModel):
    """Where to send spans (an OTLP/HTTP collector: Jaeger, Tempo, an OpenTelemetry Collector)
    and under which service name; ``sample_ratio`` keeps that share of new traces (a node
    follows the router's decision for traces the router started).

    Strict like every config section (``fedllm.config.schema.StrictModel``'s settings, not its
    class: the experiment schema holds this section too, so this module cannot import it).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    otlp_endpoint: str = Field(min_length=1, max_length=2048)
    service_name: str | None = Field(None, min_length=1, max_length=128)
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"otlp_endpoint must be an http(s):// URL of an OTLP/HTTP collector, e.g. "
                f"http://localhost:4318; got {value!r}"
            )
        return value.rstrip("/")

    @property
    def traces_url(self) -> str:
        """The OTLP/HTTP traces path under the collector's base URL."""
        return f"{self.otlp_endpoint}/v1/traces"


class _NoSpan(contextlib.AbstractContextManager[Span]):
    """The disabled span: enters to OpenTelemetry's invalid (non-recording) span."""

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(self, *_: object) -> None:
        return None


_NO_SPAN = _NoSpan()


class Tracing:
    """One app's tracer, or nothing at all when tracing is off."""

    def __init__(self, provider: TracerProvider | None, scope: str) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer(scope) if provider is not None else None

    @classmethod
    def from_config(
        cls, config: TracingConfig | None, default_service: str, scope: str = "fedllm"
    ) -> Tracing:
        """A provider exporting over OTLP/HTTP in batches, or a disabled `Tracing` for None."""
        if config is None:
            return cls(None, scope)
        # the SDK and exporter (~50 ms of imports) load only when tracing is turned on
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: config.service_name or default_service}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(config.traces_url)))
        return cls(provider, scope)

    def span(
        self,
        name: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        context: otel_context.Context | None = None,
    ) -> contextlib.AbstractContextManager[Span]:
        """A child of the current span (or of ``context``), current while the block runs."""
        if self._tracer is None:
            return _NO_SPAN
        return _recorded(self._tracer, name, attributes, kind, context)

    def record(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, AttributeValue] | None = None,
        *,
        failed: bool = False,
        context: otel_context.Context | None = None,
    ) -> None:
        """A finished child of the current span (or of ``context``), timed by the caller
        (``time.time_ns()``), for work another process did and this one only saw start and end."""
        if self._tracer is None:
            return
        span = self._tracer.start_span(
            name, context=context, attributes=attributes, start_time=start_ns
        )
        if failed:
            span.set_status(Status(StatusCode.ERROR, "failed"))
        span.end(end_time=end_ns)

    def start(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> Span:
        """A new root span the caller ends itself, for work spread over several calls
        (OpenTelemetry's invalid span when disabled); it is not made current."""
        if self._tracer is None:
            return INVALID_SPAN
        return self._tracer.start_span(name, context=otel_context.Context(), attributes=attributes)

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter (no-op when disabled)."""
        if self.provider is not None:
            self.provider.shutdown()


DISABLED = Tracing(None, "fedllm")


@contextlib.contextmanager
def _recorded(
    tracer: trace.Tracer,
    name: str,
    attributes: Mapping[str, AttributeValue] | None,
    kind: SpanKind,
    context: otel_context.Context | None,
) -> Iterator[Span]:
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as error:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise


def trace_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) for the current span; empty when there is none.

    Cheap when tracing is off: one context lookup finds no valid span and nothing is built.
    """
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str]) -> otel_context.Context:
    """The caller's trace context from W3C headers (an empty context if none or malformed)."""
    return _PROPAGATOR.extract(headers)


class TraceMiddleware:
    """Pure ASGI middleware: one server span per HTTP request, continuing a ``traceparent``.

    ``route`` maps a request path to a bounded span name part (paths may embed user ids, which
    must not reach the spans). Install it only when tracing is on.
    """

    def __init__(self, app: ASGIApp, *, tracing: Tracing, route: Callable[[str], str]) -> None:
        self.app = app
        self.tracing = tracing
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in (b"traceparent", b"tracestate")
        }
        parent = extract_context(headers) if headers else None
        route = self.route(scope["path"])
        method = scope["method"]
        attributes: dict[str, AttributeValue] = {"http.request.method": method, "http.route": route}
        with self.tracing.span(
            f"{method} {route}", attributes, kind=SpanKind.SERVER, context=parent
        ) as span:

            async def traced_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
                await send(message)

            await self.app(scope, receive, traced_send)


def known_route(routes: frozenset[str]) -> Callable[[str], str]:
    """A `TraceMiddleware` route function: the path if it is one of ``routes``, else 'other'."""

    def route(path: str) -> str:
        return path if path in routes else "other"

    return route


class RoundTracing:
    """One federated round as one trace: a root span and a child span per step.

    Flower's strategy sees a round as four calls (configure and aggregate, for training and
    for evaluation), so the root span is opened by :meth:`begin` and closed by :meth:`end`
    rather than by one ``with`` block; ``with rounds.round(3):`` does both for a caller whose
    round is one block. Inside a round, ``with rounds.selection(n)`` and
    ``with rounds.aggregation(n)`` wrap the server's own steps, and :meth:`training` and
    :meth:`evaluation` record what the hospitals did, from when the server sent its
    instructions to when it had the replies (the work itself runs in the hospitals'
    processes). Attributes are the round, counts and hospital names from the experiment
    config: never data, updates, metrics, losses or a hospital's ε. Disabled, every method
    is one attribute check.
    """

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self._root: Span = INVALID_SPAN
        self._parent: otel_context.Context | None = None

    def begin(self, server_round: int) -> None:
        """Open ``server_round``'s root span (a round left open by an error is ended first)."""
        if not self.tracing.enabled:
            return
        self.end(failed=True)
        self._root = self.tracing.start("federation.round", {"fedllm.round": server_round})
        self._parent = trace.set_span_in_context(self._root)

    def end(self, *, failed: bool = False) -> None:
        """Close the open round's root span, marked as an error if the round ``failed``."""
        if self._parent is None:
            return
        if failed:
            self._root.set_status(Status(StatusCode.ERROR, "round not completed"))
        self._root.end()
        self._root, self._parent = INVALID_SPAN, None

    @contextlib.contextmanager
    def round(self, server_round: int) -> Iterator[Span]:
        """The round's root span for one block; an exception leaving it marks it an error."""
        self.begin(server_round)
        root = self._root
        try:
            yield root
        except BaseException:
            self.end(failed=True)
            raise
        self.end()

    def selection(self, candidates: int) -> contextlib.AbstractContextManager[Span]:
        """Choosing the round's cohort among ``candidates`` hospitals (the status query too)."""
        return self.tracing.span(
            "federation.selection", {"fedllm.candidates": candidates}, context=self._parent
        )

    def training(self, hospital: str, sent_ns: int, replied_ns: int, *, ok: bool) -> None:
        """One hospital's training, as the server saw it (instruction sent → reply received)."""
        attributes = {"fedllm.hospital": hospital, "fedllm.ok": ok}
        self.tracing.record(
            "federation.training",
            sent_ns,
            replied_ns,
            attributes,
            failed=not ok,
            context=self._parent,
        )

    def aggregation(self, replies: int) -> contextlib.AbstractContextManager[Span]:
        """Aggregating ``replies`` hospitals' updates."""
        return self.tracing.span(
            "federation.aggregation", {"fedllm.replies": replies}, context=self._parent
        )

    def evaluation(self, hospitals: int, replies: int, sent_ns: int, replied_ns: int) -> None:
        """The round's evaluation: asked of ``hospitals``, answered by ``replies`` of them."""
        attributes = {"fedllm.hospitals": hospitals, "fedllm.replies": replies}
        self.tracing.record(
            "federation.evaluation", sent_ns, replied_ns, attributes, context=self._parent
        )
