"""A job that every worker taking it dies on: after max_deliver deliveries NATS gives up on it;
the stack then dead-letters it with the reason, tells the client after its last event, and
removes it from the work stream (real NATS, JetStream advisories)."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from bus.codec import decode, decode_event, encode
from bus.exhausted import ExhaustedJobs
from bus.jetstream import ensure_streams, ensure_work_consumers
from bus.messages import ChatMessage, ChatRequest, DeadLetter, ErrorEvent, SamplingSpec, TokenEvent
from tests.pipeline.harness import eventually, ops


async def test_a_job_no_worker_survives_is_dead_lettered_and_its_client_told(settings):
    settings = settings.replace(ack_wait_s=1.0, max_deliver=2)
    subjects = settings.bus.subjects
    nc = await nats.connect(settings.bus.nats_url, **ops(settings).connect_options())
    js = nc.jetstream()
    await ensure_streams(js, settings.bus, subjects)
    await ensure_work_consumers(js, settings.bus, subjects, "req")
    watcher = ExhaustedJobs(nc, subjects, "req", "local", "watcher")
    await watcher.start()
    try:
        request_id = uuid.uuid4().hex
        reply_to = subjects.events("local", "client1", request_id)
        events = await nc.subscribe(reply_to)
        # the client already got two tokens from an earlier stage
        for seq in (0, 1):
            await nc.publish(reply_to, encode(TokenEvent(request_id=request_id, seq=seq, text="x", token_ids=[1])))
        job = ChatRequest(request_id=request_id, region=settings.bus.region, priority="standard", tenant="public",
                          messages=[ChatMessage(role="user", content="I crash every worker")],
                          sampling=SamplingSpec(max_tokens=4), reply_to=reply_to)
        ack = await js.publish(subjects.request(settings.bus.region, "standard", "public", request_id), encode(job))
        # two workers take it in turn and die without a word (no ack, no nak)
        dying = await js.pull_subscribe_bind(subjects.consumer("req", settings.bus.region, "standard"),
                                             subjects.stream("req", "local"))
        for delivery in (1, 2):
            (msg,) = await dying.fetch(1, timeout=5)
            assert msg.metadata.num_delivered == delivery
        with pytest.raises(nats.errors.TimeoutError):  # NATS does not hand it out a third time
            await dying.fetch(1, timeout=3)

        async def error_event() -> ErrorEvent | None:
            while True:
                event = decode_event((await events.next_msg(timeout=5)).data)
                if isinstance(event, ErrorEvent):
                    return event
        error = await asyncio.wait_for(error_event(), 10)
        assert error.seq == 2 and error.code == "internal" and "never acknowledged" in error.message

        async def dead_letter_record() -> DeadLetter | None:
            try:
                raw = await js.get_last_msg(subjects.stream("dlq", "local"), subjects.dead_letter("local", "req"))
            except Exception:
                return None
            return decode(raw.data, DeadLetter)
        record = await eventually(dead_letter_record)
        assert record and record.deliveries == 2 and request_id in record.payload
        assert (await js.stream_info(subjects.stream("req", "local"))).state.messages == 0
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_msg(subjects.stream("req", "local"), ack.seq)
    finally:
        await watcher.stop()
        await nc.close()
