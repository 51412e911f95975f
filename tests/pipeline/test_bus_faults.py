"""Poison messages, failing handlers, priorities and cancellation, against real NATS and Redis."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec

from bus.codec import decode, encode
from bus.messages import (ChatMessage, DeadLetter, DecodeJob, FinalEvent, KvHandle, PrefillStats,
                          SamplingSpec)
from bus.subjects import Subjects
from edge.client import EdgeClient
from services.lab.fake_engine import BLOCK, LAYOUT, FakeEngine, reply_for
from kv_store.keys import prompt_block_keys
from tests.pipeline.harness import bus_client, eventually, running_stack
from tests.pipeline.test_chat_flow import engines, expected


async def dead_letter_of(js, subjects: Subjects, kind: str) -> DeadLetter | None:
    try:
        raw = await js.get_last_msg(subjects.stream("dlq", "local"), subjects.dead_letter("local", kind))
    except Exception:
        return None
    return decode(raw.data, DeadLetter)


async def test_undecodable_bus_message_is_dead_lettered_once_and_the_worker_goes_on(settings):
    subjects = settings.bus.subjects
    async with running_stack(settings, *engines(settings)) as stack, bus_client(settings) as nc:
        js = nc.jetstream()
        await js.publish(subjects.request("local", "standard", "public", "poison1"), b"\x00\xffnot json")
        record = await eventually(lambda: dead_letter_of(js, subjects, "req"))
        assert record and "JSON" in record.reason and record.encoding == "base64"
        info = await js.consumer_info(subjects.stream("req", "local"), subjects.consumer("req", "local", "standard"))
        assert info.num_ack_pending == 0 and info.num_redelivered == 0 and info.num_pending == 0
        async with await EdgeClient.connect(stack.url) as client:
            result = await client.complete([{"role": "user", "content": "after poison"}], priority="standard")
        assert result.text == expected("after poison")


async def test_invalid_job_with_a_reply_subject_gets_an_error_event_and_a_dead_letter(settings):
    subjects = settings.bus.subjects
    reply = subjects.events("local", "probe", "job1")
    async with running_stack(settings, *engines(settings)), bus_client(settings) as nc:
        events = await nc.subscribe(reply)
        bad = {"type": "chat_request", "request_id": "job1", "region": "local", "reply_to": reply}
        await nc.jetstream().publish(subjects.request("local", "batch", "public", "job1"), json.dumps(bad).encode())
        msg = await events.next_msg(timeout=5)
        event = json.loads(msg.data)
        assert event["type"] == "error" and event["code"] == "invalid_request"
        assert "missing required field" in event["message"]
        record = await eventually(lambda: dead_letter_of(nc.jetstream(), subjects, "req"))
        assert record and "missing required field" in record.reason


class ExplodingEngine(FakeEngine):
    async def generate(self, request_id, prompt_token_ids, sampling, max_tokens, kv=None):
        if b"explode" in bytes(prompt_token_ids):
            raise RuntimeError("engine blew up")
        async for chunk in super().generate(request_id, prompt_token_ids, sampling, max_tokens, kv):
            yield chunk


async def test_failing_job_is_retried_then_dead_lettered_while_others_are_served(settings):
    subjects = settings.bus.subjects
    async with running_stack(settings, ExplodingEngine("prefill"), FakeEngine("decode")) as stack, \
            bus_client(settings) as nc:
        async with await EdgeClient.connect(stack.url) as client:
            failing = asyncio.create_task(client.complete([{"role": "user", "content": "please explode"}]))
            fine = await client.complete([{"role": "user", "content": "calm"}])
            assert fine.text == expected("calm")
            result = await asyncio.wait_for(failing, 30)
        assert result.error["code"] == "internal" and "3 times" in result.error["message"]
        record = await eventually(lambda: dead_letter_of(nc.jetstream(), subjects, "req"))
        assert record.deliveries == settings.bus.max_deliver and "engine blew up" in record.reason


async def test_interactive_request_overtakes_a_batch_backlog(settings):
    settings = settings.replace(prefill_slots=1)
    slow_prefill = FakeEngine("prefill", token_delay_s=0.15)
    async with running_stack(settings, slow_prefill, FakeEngine("decode")) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            order: list[str] = []

            async def run(name: str, priority: str) -> None:
                async for frame in client.stream([{"role": "user", "content": name}], id=name,
                                                 priority=priority, max_tokens=5):
                    if frame["type"] == "token" and frame["seq"] == 0:
                        order.append(name)

            batch = [asyncio.create_task(run(f"batch{i}", "batch")) for i in range(6)]
            await asyncio.sleep(0.05)  # the backlog is queued before the interactive request
            urgent = asyncio.create_task(run("urgent", "interactive"))
            await asyncio.gather(*batch, urgent)
    # the first batch request may already be in the worker's single slot; the next one is urgent
    assert order.index("urgent") <= 1, order


async def test_client_disconnect_cancels_generation_in_the_decode_worker_after_the_grace(settings):
    settings = settings.replace(resume_grace_s=1.0)
    decode_engine = FakeEngine("decode", token_delay_s=0.05)
    async with running_stack(settings, FakeEngine("prefill"), decode_engine) as stack, \
            bus_client(settings) as nc:
        events = await nc.subscribe(f"{settings.bus.subject_prefix}.evt.>")
        client = await EdgeClient.connect(stack.url)
        long_question = "tell me everything " * 10
        stream = client.stream([{"role": "user", "content": long_question}], max_tokens=500)
        seen = 0
        async for frame in stream:
            seen += frame["type"] == "token"
            if seen == 3:
                break
        await client.close()  # the user closes the tab
        await asyncio.sleep(0.3)  # within the grace period it may still come back
        assert stack.decode.worker.counters.cancelled == 0
        await eventually(lambda: stack.decode.worker.counters.cancelled == 1)
        assert decode_engine.aborted == 1
        published = 0
        while True:
            try:
                await events.next_msg(timeout=0.5)
                published += 1
            except Exception:
                break
        assert published < len(reply_for(long_question.encode())) / 2


async def test_cancel_frame_cancels_one_request_and_answers_cancelled(settings):
    decode_engine = FakeEngine("decode", token_delay_s=0.05)
    async with running_stack(settings, FakeEngine("prefill"), decode_engine) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            frames = []
            async for frame in client.stream([{"role": "user", "content": "x" * 100}], id="c1"):
                frames.append(frame)
                if frame["type"] == "token" and frame["seq"] == 2:
                    await client.cancel("c1")
            other = await client.complete([{"role": "user", "content": "unaffected"}])
        assert frames[-1] == {"type": "error", "id": "c1", "code": "cancelled",
                              "message": "cancelled by the client", "retryable": False}
        assert other.text == expected("unaffected")
        await eventually(lambda: stack.decode.worker.counters.cancelled == 1)


async def test_kv_handle_carries_the_prompt_and_a_second_turn_reuses_it(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            turn1 = [{"role": "system", "content": "be brief " * 10}, {"role": "user", "content": "first"}]
            r1 = await client.complete(turn1)
            turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "second"}]
            r2 = await client.complete(turn2)
    assert r1.done["kv"]["loaded_tokens"] > 0 and not r1.done["kv"]["recomputed"]
    assert r1.done["usage"]["cached_prompt_tokens"] == 0
    assert r2.done["usage"]["cached_prompt_tokens"] > 0


async def test_decode_recomputes_when_the_handle_names_missing_blocks(settings):
    subjects = settings.bus.subjects
    engine = FakeEngine("decode")
    prompt = engine.render_chat([ChatMessage("user", "recompute me, please, now")])
    reply = reply_for(bytes(prompt))
    keys = prompt_block_keys(settings.kv.kv_key_prefix, LAYOUT, prompt, BLOCK, len(prompt) // BLOCK)
    handle = KvHandle(model_id="fake", layout=LAYOUT, block_size=BLOCK, keys=keys,
                      num_tokens=len(keys) * BLOCK, content_hash=keys[-1])
    stats = PrefillStats(worker_id="probe", queue_ms=1, prefill_ms=2, cached_tokens=0, done_at=time.time())
    job = DecodeJob(request_id="rc1", region="local", priority="interactive",
                    reply_to=subjects.events("local", "probe", "rc1"), prompt_token_ids=prompt,
                    first_token_id=reply[0], sampling=SamplingSpec(max_tokens=200), prefill=stats, kv=handle)
    async with running_stack(settings, FakeEngine("prefill"), engine_with_store(settings)), \
            bus_client(settings) as nc:
        events = await nc.subscribe(job.reply_to)
        await nc.jetstream().publish(subjects.decode("local", "interactive"), encode(job))
        text, final = "", None
        while final is None:
            event = msgspec.json.decode((await events.next_msg(timeout=5)).data)
            if event["type"] == "token":
                text += event["text"]
            else:
                final = decode(encode_back(event), FinalEvent)
    assert text == reply[1:].decode()
    assert final.kv.recomputed and final.kv.loaded_tokens == 0
    assert final.usage.cached_prompt_tokens == 0


def engine_with_store(settings):
    from kv_store.block_store import BlockStore
    return FakeEngine("decode", store=BlockStore(settings.kv.redis_url, 60), key_prefix=settings.kv.kv_key_prefix)


def encode_back(event: dict) -> bytes:
    return msgspec.json.encode(event)
