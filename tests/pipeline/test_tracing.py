"""One request, one trace: the edge's span, each stage's queue wait and span, linked only through
the W3C trace context the NATS headers carry (edge, prefill and decode share no Python context
here, as they share none in their own processes), under the client's own traceparent. Real NATS
and Redis, fake engines; spans caught by OpenTelemetry's in-memory exporter."""

from __future__ import annotations

import json

import aiohttp
import pytest
import websockets
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bus.tracing import context_of, headers_with_context
from tests.pipeline.harness import eventually, running_stack
from tests.pipeline.test_chat_flow import engines, expected
from tests.pipeline.test_openai_api import api, ready

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def spans():
    """Every span this process ends, kept in memory. The global provider can be set once: one an
    earlier test set (an engine's, in this process) gets the exporter instead."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # later tests' spans are dropped


def test_the_trace_context_round_trips_through_headers_and_a_bad_one_is_ignored():
    ctx = context_of({"Traceparent": TRACEPARENT})
    assert trace.get_current_span(ctx).get_span_context().trace_id == int(CLIENT_TRACE, 16)
    assert headers_with_context({"Nats-Msg-Id": "x"}, ctx)["traceparent"] == TRACEPARENT
    for bad in ("00-zz-00f067aa0ba902b7-01", "x" * 4000, ""):
        assert not trace.get_current_span(context_of({"traceparent": bad})).get_span_context().is_valid
    assert headers_with_context({}) == {}  # no span: nothing added


async def test_one_request_is_one_connected_trace_across_the_stages(settings, spans):
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        body = {"model": "fake", "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 100}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{api(stack)}/chat/completions", json=body,
                                 headers={"traceparent": TRACEPARENT}) as r:
                assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == expected("trace me")
                request_id = r.headers["X-Request-Id"]

        def ours():
            return [s for s in spans.get_finished_spans() if s.context.trace_id == int(CLIENT_TRACE, 16)]
        assert await eventually(lambda: {"edge request", "prefill", "decode"} <= {s.name for s in ours()})
    by_id = {s.context.span_id: s for s in ours()}
    named = {}
    for s in by_id.values():
        named.setdefault(s.name, []).append(s)
    (edge,), (prefill,), (decode,) = named["edge request"], named["prefill"], named["decode"]
    # the client's span is the edge's parent; every other span hangs off the edge's, by headers only
    assert edge.parent.span_id == 0x00F067AA0BA902B7 and edge.kind == trace.SpanKind.SERVER
    assert edge.attributes["grokstack.request_id"] == request_id
    assert prefill.parent.span_id == edge.context.span_id
    assert decode.parent.span_id == prefill.context.span_id  # the decode job's headers
    queues = {s.parent.span_id: s for s in named["queue"]}
    assert set(queues) == {edge.context.span_id, prefill.context.span_id}  # waits for prefill, then decode
    # each wait runs from its publish to the stage taking the job; decode's starts once prefill published
    for wait, stage in ((queues[edge.context.span_id], prefill), (queues[prefill.context.span_id], decode)):
        assert wait.start_time < wait.end_time == stage.start_time
    assert prefill.start_time < queues[prefill.context.span_id].start_time <= prefill.end_time
    for span in by_id.values():  # one tree: each span's parent is in it, or is the client's
        assert span is edge or span.parent.span_id in by_id, span.name
    assert edge.end_time >= decode.end_time and "first token" in [e.name for e in edge.events]


async def test_a_websocket_clients_traceparent_is_the_parent_of_its_chats(settings, spans):
    trace_id, client_span = "5bf92f3577b34da6a3ce929d0e0e4737", "01f067aa0ba902b8"
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        # a header sent twice (as proxies do) beside it: websockets' Headers raise on reading one
        async with websockets.connect(stack.url, additional_headers=[
                ("traceparent", f"00-{trace_id}-{client_span}-01"), ("X-Forwarded-For", "10.0.0.1"),
                ("X-Forwarded-For", "10.0.0.2")]) as ws:
            await ws.send(json.dumps({"type": "chat", "id": "c1", "max_tokens": 100,
                                      "messages": [{"role": "user", "content": "trace my socket"}]}))
            while json.loads(await ws.recv())["type"] != "done":
                pass

        def edges():
            return [s for s in spans.get_finished_spans()
                    if s.context.trace_id == int(trace_id, 16) and s.name == "edge request"]
        assert await eventually(edges)
    (edge,) = edges()
    assert edge.parent.span_id == int(client_span, 16)
