"""Jobs published straight onto the bus, around the edge: by a raw NATS client with plain JSON
and by the project's JobClient, as an operator or with a client login bound to its tenant. Fake
engine; real NATS/JetStream, Redis and workers."""

from __future__ import annotations

import asyncio
import json

import msgspec
import nats.js.errors
import pytest

import structlog

from bus.client import JobClient
from bus.codec import decode, encode
from bus.credentials import BusAuth
from bus.messages import ChatMessage, DeadLetter, FinalEvent, TokenEvent, Usage
from tests.pipeline.harness import bus_client, eventually, ops, running_stack
from tests.pipeline.test_chat_flow import engines, expected


def raw_job(prefix: str, request_id: str, content: str, **overrides) -> dict:
    """A job as any NATS client would write it, from the README, with nothing of ours."""
    job = {"type": "chat_request", "v": 1, "request_id": request_id, "region": "local",
           "priority": "batch", "tenant": "public", "messages": [{"role": "user", "content": content}],
           "sampling": {"max_tokens": 50, "temperature": 0.0},
           "reply_to": f"{prefix}.evt.local.rawclient.{request_id}"}
    job.update(overrides)
    return job


async def collect(nc, subject: str, until_final: bool = True, timeout: float = 10.0) -> list[dict]:
    events: list[dict] = []
    done = asyncio.Event()

    async def on_event(msg):
        event = json.loads(msg.data)
        events.append(event)
        if event["type"] in ("final", "error"):
            done.set()

    sub = await nc.subscribe(subject, cb=on_event)
    return events, done, sub


async def test_a_raw_nats_client_publishing_json_gets_its_tokens(settings):
    prefix = settings.bus.subject_prefix
    async with running_stack(settings, *engines(settings)):
        async with bus_client(settings) as nc:
            events, done, _ = await collect(nc, f"{prefix}.evt.local.rawclient.job1")
            js = nc.jetstream()
            ack = await js.publish(f"{prefix}.req.local.batch.public.job1",
                                   json.dumps(raw_job(prefix, "job1", "hello bus")).encode(),
                                   headers={"Nats-Msg-Id": "job1"})
            assert ack.stream == f"{prefix.upper()}_REQ_local"
            await asyncio.wait_for(done.wait(), 10)
            # a subject of the layout before tenants finds no stream: refused at once, not queued
            with pytest.raises(nats.js.errors.NoStreamResponseError):
                await js.publish(f"{prefix}.req.local.batch", json.dumps(raw_job(prefix, "old1", "x")).encode())
    tokens = [e for e in events if e["type"] == "token"]
    assert [e["seq"] for e in tokens] == list(range(len(tokens)))
    assert "".join(e["text"] for e in tokens) == expected("hello bus")
    assert events[-1]["type"] == "final" and events[-1]["finish_reason"] == "stop"


async def test_a_malformed_direct_publish_gets_an_error_event_and_a_dead_letter(settings):
    prefix = settings.bus.subject_prefix
    bad = raw_job(prefix, "bad1", "hi", sampling={"max_tokens": 0})
    async with running_stack(settings, *engines(settings)):
        async with bus_client(settings) as nc:
            events, done, _ = await collect(nc, f"{prefix}.evt.local.rawclient.bad1")
            js = nc.jetstream()
            await js.publish(f"{prefix}.req.local.interactive.public.bad1", json.dumps(bad).encode())
            await asyncio.wait_for(done.wait(), 10)
            dead = await js.get_last_msg(f"{prefix.upper()}_DLQ_local", f"{prefix}.dlq.local.req")
            # ...and a good job right after it is served as usual
            async with await JobClient.connect(settings.bus.nats_url, prefix, auth=ops(settings)) as client:
                ok = await client.generate([ChatMessage(role="user", content="still fine")],
                                           max_tokens=50, temperature=0.0)
    assert events == [{"type": "error", "v": 1, "request_id": "bad1", "seq": 0,
                       "code": "invalid_request", "message": events[0]["message"],
                       "retryable": False, "attempt": 0, "worker_id": settings.bus.worker_name,
                       "worker_role": "prefill"}]
    assert "max_tokens" in events[0]["message"] and ">= 1" in events[0]["message"]
    record = decode(dead.data, DeadLetter)
    assert record.subject == f"{prefix}.req.local.interactive.public.bad1" and "max_tokens" in record.reason
    assert json.loads(record.payload) == bad
    assert ok.ok and ok.text == expected("still fine")


async def test_reply_to_must_be_the_requests_own_event_subject(settings):
    prefix = settings.bus.subject_prefix
    stray = raw_job(prefix, "r2", "hi", reply_to=f"{prefix}.evt.local.rawclient.someone-else")
    async with running_stack(settings, *engines(settings)):
        async with bus_client(settings) as nc:
            js = nc.jetstream()
            await js.publish(f"{prefix}.req.local.batch.public.r2", json.dumps(stray).encode())
            dead = await eventually(lambda: _last_dead_letter(js, prefix))
    assert dead is not None and "reply_to" in dead.reason and f"{prefix}.evt.<region>.<client>.r2" in dead.reason


async def _last_dead_letter(js, prefix: str) -> DeadLetter | None:
    try:
        return decode((await js.get_last_msg(f"{prefix.upper()}_DLQ_local", f"{prefix}.dlq.local.req")).data,
                      DeadLetter)
    except Exception:
        return None


async def test_job_client_streams_events_and_waits_for_the_whole_text(settings):
    async with running_stack(settings, *engines(settings, delay=0.002)):
        async with await JobClient.connect(settings.bus.nats_url, settings.bus.subject_prefix,
                                       auth=ops(settings)) as client:
            job = await client.submit(client.request([ChatMessage(role="user", content="one")],
                                                     max_tokens=80, temperature=0.0))
            seqs = [event.seq async for event in job]
            results = await asyncio.gather(*(
                client.generate([ChatMessage(role="user", content=f"q{i}")], max_tokens=80)
                for i in range(4)))
    assert seqs == list(range(len(seqs))) and len(seqs) > 2
    assert [r.text for r in results] == [expected(f"q{i}") for i in range(4)]
    assert all(r.usage and r.usage.completion_tokens > 0 for r in results)


async def test_the_same_idempotency_key_runs_once_and_both_callers_get_the_result(settings):
    prefill, decode_engine = engines(settings, delay=0.01)
    async with running_stack(settings, prefill, decode_engine) as stack:
        async with await JobClient.connect(settings.bus.nats_url, settings.bus.subject_prefix,
                                       auth=ops(settings)) as a, \
                await JobClient.connect(settings.bus.nats_url, settings.bus.subject_prefix,
                                       auth=ops(settings)) as b:
            messages = [ChatMessage(role="user", content="only once please")]
            first = await a.submit(a.request(messages, max_tokens=60, idempotency_key="order-42"))
            second = await b.submit(b.request(messages, max_tokens=60, idempotency_key="order-42"))
            one, two = await asyncio.gather(first.result(), second.result())
            # later, after the job finished, a third caller still gets the same answer
            three = await (await b.submit(b.request(messages, max_tokens=60,
                                                    idempotency_key="order-42"))).result()
        served = stack.decode.worker.counters.served
    assert not one.joined and two.joined and three.joined
    assert one.ok and one.text == two.text == three.text == expected("only once please")
    assert msgspec.to_builtins(one.events) == msgspec.to_builtins(two.events)
    assert served == 1  # one generation for three submissions


async def test_an_idempotency_key_that_is_not_a_valid_id_is_refused_before_publishing(settings):
    async with await JobClient.connect(settings.bus.nats_url, settings.bus.subject_prefix,
                                       auth=ops(settings)) as client:
        with pytest.raises(ValueError, match="request id .has space. must be"):
            client.request([ChatMessage(role="user", content="x")], idempotency_key="has space")


def client_auth(settings) -> BusAuth:
    """The embedded server's client login: a back-end service of tenant `public`, id `dev`."""
    return BusAuth.of(settings.bus, "client")


async def test_a_client_login_submits_its_tenants_jobs_and_gets_the_answer(settings):
    async with running_stack(settings, *engines(settings)):
        async with await JobClient.connect(settings.bus.nats_url, settings.bus.subject_prefix,
                                           auth=client_auth(settings)) as client:
            request = client.request([ChatMessage(role="user", content="as a client")], max_tokens=50)
            result = await (await client.submit(request)).result()
    assert (client.client_id, request.tenant) == ("dev", "public")
    assert client.request_subject(request).endswith(f".req.local.standard.public.{request.request_id}")
    assert result.ok and result.text == expected("as a client")


async def test_under_a_client_login_a_gap_is_a_stream_gap_error_without_reading_the_capture(settings):
    """A client may not read the capture: the gap is not looked up there (no refused request, no
    wait for an answer that never comes) and ends the job with a retryable error."""
    prefix = settings.bus.subject_prefix
    with structlog.testing.capture_logs() as logs:
        async with await JobClient.connect(settings.bus.nats_url, prefix, auth=client_auth(settings)) as client:
            job = await client.submit(client.request([ChatMessage(role="user", content="gap")]), timeout_s=60)
            async with bus_client(settings) as worker:  # events as a worker sends them, the second lost
                reply_to = client.reply_to(job.request_id)
                for event in (TokenEvent(request_id=job.request_id, seq=0, text="a", token_ids=[1]),
                              FinalEvent(request_id=job.request_id, seq=2, finish_reason="stop",
                                         usage=Usage(1, 0, 2))):
                    await worker.publish(reply_to, encode(event))
                await worker.flush()
            events = [event async for event in job]
    assert [type(e).__name__ for e in events] == ["TokenEvent", "ErrorEvent"]
    assert events[1].code == "stream_gap" and events[1].seq == 1 and events[1].retryable
    assert not [entry for entry in logs if "violation" in str(entry).lower()]


async def test_a_request_whose_body_names_another_tenant_than_its_subject_is_dead_lettered_once(settings):
    """The tenant a worker serves (its KV namespace) is the one NATS let the publisher use, the
    subject's: a body that claims another is malformed, refused once, never served."""
    prefix = settings.bus.subject_prefix
    forged = raw_job(prefix, "forged1", "hi", tenant="acme")
    async with running_stack(settings, *engines(settings)) as stack:
        async with bus_client(settings) as nc:
            events, done, _ = await collect(nc, f"{prefix}.evt.local.rawclient.forged1")
            js = nc.jetstream()
            await js.publish(f"{prefix}.req.local.batch.public.forged1", json.dumps(forged).encode())
            await asyncio.wait_for(done.wait(), 10)
            dead = await eventually(lambda: _last_dead_letter(js, prefix))
        served = stack.prefill.worker.counters.served
    assert [(e["type"], e["code"]) for e in events] == [("error", "invalid_request")]
    assert "tenant" in events[0]["message"] and "'acme'" in events[0]["message"]
    assert dead.subject == f"{prefix}.req.local.batch.public.forged1" and dead.deliveries == 1
    assert served == 0
