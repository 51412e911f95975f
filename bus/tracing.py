"""Trace context on the bus: a request's W3C `traceparent` (and `tracestate`) travels in the NATS
headers of each message that carries its work, so one request is one trace across the edge, the
queues, the prefill and decode workers and the regions it crosses (OpenTelemetry).

Pure functions over header dicts, apart from sockets (as nats.py keeps its wire encoding): what a
publisher adds to its headers, and the context a consumer reads back. A header from outside (an
HTTP client's `traceparent`) is parsed by the W3C propagator, which ignores a malformed one.

Spans are made with OpenTelemetry's API only. Without a configured SDK (no
GROKSTACK_OTLP_TRACES_ENDPOINT: services/telemetry.py) that API does nothing, at next to no cost.
"""

from __future__ import annotations

from typing import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_W3C = TraceContextTextMapPropagator()
TRACE_HEADERS = ("traceparent", "tracestate")


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def headers_with_context(headers: Mapping[str, str] | None = None,
                         ctx: otel_context.Context | None = None) -> dict[str, str]:
    """`headers` plus the trace context (the current one unless `ctx`): for a message's publish,
    or vLLM's `trace_headers`."""
    out = dict(headers or {})
    _W3C.inject(out, context=ctx)
    return out


def context_of(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message's (or an HTTP request's) headers carry; an empty one without."""
    if isinstance(headers, dict):  # a NATS message's: names as their publisher wrote them
        carrier = {k.lower(): v for k, v in headers.items() if k.lower() in TRACE_HEADERS}
        return _W3C.extract(carrier)
    carrier = {}
    for name in TRACE_HEADERS:  # HTTP's, case-insensitive: the ones wanted only (websockets' Headers
        try:                    # raise on reading any header sent twice)
            value = headers.get(name) if headers else None
        except Exception:  # noqa: BLE001 - a trace header sent twice (MultipleValuesError): none taken
            value = None
        if value:
            carrier[name] = value
    return _W3C.extract(carrier)


def ns(unix_s: float) -> int:
    """Unix seconds as OpenTelemetry's span timestamps (nanoseconds)."""
    return int(unix_s * 1e9)


def measured_span(name: str, tracer_: trace.Tracer, started_at: float, seconds: float,
                  attributes: Mapping[str, object] | None = None, kind: SpanKind = SpanKind.INTERNAL) -> None:
    """A span for something measured before (a queue wait, a KV transfer the connector timed), as
    a child of the current span: from `started_at` (unix seconds) for `seconds`."""
    if seconds <= 0 or not trace.get_current_span().is_recording():
        return
    span: Span = tracer_.start_span(name, kind=kind, start_time=ns(started_at),
                                    attributes=dict(attributes or {}))  # type: ignore[arg-type]
    span.end(end_time=ns(started_at + seconds))
