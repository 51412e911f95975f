"""Capture, replay and trace against real NATS/JetStream and Redis, with the fake engine."""

from __future__ import annotations

import asyncio
import time

import pytest

from bus import capture
from bus.capture import Selection
from bus.client import JobClient
from bus.jetstream import declare_streams
from bus.codec import encode
from bus.messages import Cancel, ChatMessage, ChatRequest, DecodeJob, SamplingSpec
from bus.subjects import Subjects
from services import replay, trace
from tests.pipeline.harness import bus_client, eventually, ops, running_stack
from tests.pipeline.test_chat_flow import engines, expected


async def run_jobs(settings, jobs: list[dict]) -> list:
    async with await JobClient.connect(settings.bus.nats_url, settings.bus.subject_prefix,
                                       auth=ops(settings)) as client:
        results = []
        for job in jobs:
            content = job.pop("content")
            results.append(await client.generate([ChatMessage(role="user", content=content)],
                                                 max_tokens=40, temperature=0.0, **job))
        return results


async def read(settings, **selection) -> list:
    async with bus_client(settings) as nc:
        return [i async for i in capture.read(nc.jetstream(), settings.bus.subjects,
                                              settings.bus.region, Selection(**selection))]


async def test_capture_holds_each_hop_in_order_and_filters_are_exact(settings):
    async with running_stack(settings, *engines(settings)):
        first = await run_jobs(settings, [
            {"content": "a", "conversation_id": "c1", "priority": "interactive"},
            {"content": "b", "conversation_id": "c2", "priority": "batch"}])
        await asyncio.sleep(0.3)
        boundary = time.time()
        await asyncio.sleep(0.3)
        later = await run_jobs(settings, [{"content": "c", "conversation_id": "c1"}])
    a, b, c = (r.request_id for r in [*first, *later])

    one = await read(settings, request_id=a)
    kinds = [i.kind for i in one]
    # prefill streams the first token, then hands the decode job on
    assert kinds[:3] == ["chat_request", "token", "decode_job"] and kinds[-1] == "final"
    assert set(kinds[3:-1]) == {"token"} and len(kinds) == 3 + first[0].usage.completion_tokens
    assert [i.seq for i in one] == sorted(i.seq for i in one)
    assert [i.message.seq for i in one if i.kind == "token"] == list(range(len(kinds) - 3))
    assert "".join(i.message.text for i in one if i.kind == "token") == expected("a")
    assert one[2].message.kv is not None  # the decode job carries its KV handle

    conv = await read(settings, conversation_id="c1")
    assert {i.request_id for i in conv} == {a, c}
    batch = await read(settings, subject=f"{settings.bus.subject_prefix}.req.*.batch.>")
    assert [(i.kind, i.request_id) for i in batch] == [("chat_request", b)]

    assert {i.request_id for i in await read(settings, since=boundary)} == {c}
    assert {i.request_id for i in await read(settings, until=boundary)} == {a, b}

    everything = await read(settings)
    inner = everything[3:9]
    ranged = await read(settings, first_seq=inner[0].seq, last_seq=inner[-1].seq)
    assert [i.seq for i in ranged] == [i.seq for i in inner]


async def _record_cancels(settings, gaps: list[float]) -> list:
    """Cancels published with known gaps between them: captured traffic with a known pace."""
    subjects = settings.bus.subjects
    async with bus_client(settings) as nc:
        await declare_streams(nc.jetstream(), settings.bus, subjects)  # its capture limits
        for n, gap in enumerate([0.0, *gaps]):
            await asyncio.sleep(gap)
            await nc.publish(subjects.cancel("local"), encode(Cancel(request_id=f"r{n}", reason="x")))
        await nc.flush()
    return await eventually(lambda: _captured_n(settings, len(gaps) + 1))


async def _captured_n(settings, n: int):
    items = await read(settings)
    return items if len(items) == n else None


async def _sleep_jitter() -> float:
    """How late this machine wakes a sleeper right now: the pace tolerance of this run."""
    worst = 0.0
    for _ in range(10):
        start = time.monotonic()
        await asyncio.sleep(0.02)
        worst = max(worst, time.monotonic() - start - 0.02)
    return worst


async def test_replay_keeps_order_and_pace_and_stays_in_the_sandbox(settings):
    items = await _record_cancels(settings, [0.25, 0.1, 0.4])
    live, sandbox = settings.bus.subjects, Subjects(settings.bus.subject_prefix + "sb")
    arrivals: list[tuple[float, str]] = []
    on_live: list[str] = []
    async with bus_client(settings) as nc:
        async def on_sandbox(msg):
            arrivals.append((time.monotonic(), msg.data))

        async def on_live_msg(msg):
            on_live.append(msg.subject)

        await nc.subscribe(f"{sandbox.prefix}.>", cb=on_sandbox)
        await nc.subscribe(f"{live.prefix}.>", cb=on_live_msg)
        jitter = await _sleep_jitter()
        with pytest.raises(replay.LiveSubjectsRefused):
            await replay.republish(nc, items, live, live, speed=0)
        await replay.republish(nc, items, live, sandbox, speed=1.0)
        await eventually(lambda: len(arrivals) == len(items))
        paced = list(arrivals)
        arrivals.clear()
        await replay.republish(nc, items, live, sandbox, speed=0)
        await eventually(lambda: len(arrivals) == len(items))
        await nc.flush()
    assert [data for _, data in paced] == [i.data for i in items]  # same order, same bytes
    tolerance = 3 * jitter + 0.015
    for (t1, _), (t2, _), a, b in zip(paced, paced[1:], items, items[1:], strict=False):
        assert abs((t2 - t1) - (b.time - a.time)) <= tolerance, (t2 - t1, b.time - a.time, tolerance)
    assert [data for _, data in arrivals] == [i.data for i in items]
    assert on_live == []  # nothing reached a live subject


def test_a_replayed_request_answers_into_the_sandbox():
    live, sandbox = Subjects("gs"), Subjects("sandbox")
    req = ChatRequest(request_id="r1", region="eu", priority="batch",
                      messages=[ChatMessage(role="user", content="x")],
                      sampling=SamplingSpec(max_tokens=3), tenant="acme",
                      reply_to="gs.evt.eu.edge1.r1")
    item = capture.Captured(source="capture", seq=1, time=0.0, subject="gs.req.eu.batch.acme.r1",
                            data=encode(req), message=req)
    subject, payload = replay.retargeted(item, live, sandbox)
    assert subject == "sandbox.req.eu.batch.acme.r1"
    assert b'"reply_to":"sandbox.evt.eu.edge1.r1"' in payload


async def test_capture_retention_is_enforced_by_the_server(settings):
    by_age = settings.replace(capture_max_age_s=1.0)
    await _record_cancels(by_age, [0.0, 0.0])
    async with bus_client(settings) as nc:
        js = nc.jetstream()
        stream = settings.bus.subjects.stream("capture", settings.bus.region)
        emptied = await eventually(lambda: _messages(js, stream, 0), timeout=10)
        assert emptied, "the server kept traffic older than max_age"


async def test_capture_size_limit_drops_the_oldest(settings):
    small = settings.replace(capture_max_mb=1)
    subjects = settings.bus.subjects
    async with bus_client(settings) as nc:
        js = nc.jetstream()
        await declare_streams(js, small.bus, subjects)
        for n in range(30):  # 30 events of 100 kB into a 1 MB capture
            await nc.publish(subjects.events("local", "e1", f"r{n}"), b"x" * 100_000)
        await nc.flush()
        stream = subjects.stream("capture", "local")
        await eventually(lambda: _last_seq(js, stream, 30))
        state = (await js.stream_info(stream)).state
    assert state.bytes <= 1024**2 and state.last_seq == 30 and state.first_seq > 20


async def _last_seq(js, stream: str, n: int) -> bool:
    return (await js.stream_info(stream)).state.last_seq == n


async def _messages(js, stream: str, n: int) -> bool:
    return (await js.stream_info(stream)).state.messages == n


async def test_rerun_diff_is_identical_for_the_same_request_and_shows_a_changed_one(settings):
    async with running_stack(settings, *engines(settings)):
        [done] = await run_jobs(settings, [{"content": "tell me about the bus"}])
        items = await read(settings, request_id=done.request_id)
        async with await JobClient.connect(settings.bus.nats_url, settings.bus.subject_prefix,
                                       auth=ops(settings)) as client:
            same = [r async for r in replay.rerun(client, items, {})]
            changed = [r async for r in replay.rerun(client, items, {"max_tokens": 5})]
    assert len(same) == 1 and same[0].identical, same[0].report()
    assert "identical" in same[0].report()
    assert not changed[0].identical and len(changed[0].new_tokens) == 5
    report = changed[0].report()
    assert "DIFFERENT" in report and "first 5 tokens agree" in report and "+++ rerun" in report


async def test_trace_shows_every_hop_of_a_request(settings):
    async with running_stack(settings, *engines(settings)):
        [done] = await run_jobs(settings, [{"content": "trace me"}])
    items = await read(settings, request_id=done.request_id)
    steps = trace.timeline(items, done.request_id)
    text = trace.render(done.request_id, steps)
    wheres = [s.where for s in steps]
    assert wheres[0] == "edge" and {"prefill", "kv", "decode", "bus"} <= set(wheres)
    assert [s.at_ms for s in steps] == sorted(s.at_ms for s in steps)
    for phrase in ("published to", "took it after", "prefill done", "wrote", "first token",
                   "decode worker took the job", "prompt tokens loaded", "final: stop"):
        assert phrase in text, (phrase, text)
    assert isinstance(items[2].message, DecodeJob)
    with pytest.raises(LookupError):
        trace.timeline([], "nope")
