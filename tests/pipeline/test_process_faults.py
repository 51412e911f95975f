"""Workers that die or are stopped while they hold a request, and a broker that restarts under
load (real NATS and Redis, fake engines). In every case the client gets each token once, in
order, and the whole answer; or, for the broker, a clear retryable error and never a hang."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from bus.codec import decode_event
from bus.capture import sent_so_far
from bus.codec import encode
from bus.messages import TokenEvent
from edge.client import EdgeClient
from services.lab.fake_engine import FakeEngine
from inference.resend import RecentEvents, resend_after_reconnects
from kv_store.block_store import BlockStore
from services.embedded import EmbeddedNats
from services.processes import RunningWorker, start_worker
from services.provision import provision
from tests.pipeline.harness import bus_client, eventually, running_stack
from tests.pipeline.test_chat_flow import expected
from tests.pipeline.test_migration import die

QUESTION = "an answer long enough to still be running when its worker goes away"


def fake(settings, role: str, delay: float = 0.0) -> FakeEngine:
    return FakeEngine(role, token_delay_s=delay, store=BlockStore(settings.kv.redis_url, 60),
                      key_prefix=settings.kv.kv_key_prefix)


async def spare(settings, role: str, engine: FakeEngine) -> RunningWorker:
    return await start_worker(settings.replace(worker_id=f"{settings.bus.worker_id}-{role}-spare"), role, engine)


async def count_tokens(nc, subjects) -> Counter[tuple[str, int]]:
    """How many times each (request, seq) token event goes over the bus (the edge must show
    each once anyway)."""
    seen: Counter[tuple[str, int]] = Counter()

    async def count(msg) -> None:
        event = decode_event(msg.data)
        if isinstance(event, TokenEvent):
            seen[event.request_id, event.seq] += 1
    await nc.subscribe(subjects.all_events(), cb=count)
    return seen


async def frames_of(client: EdgeClient, question: str, **params) -> list[dict]:
    return [f async for f in client.stream([{"role": "user", "content": question}], **params)]


def assert_whole_answer(frames: list[dict], question: str = QUESTION) -> None:
    assert frames[-1]["type"] == "done", frames[-1]
    tokens = [f for f in frames if f["type"] == "token"]
    assert [t["seq"] for t in tokens] == list(range(len(tokens))), "a token was lost or repeated"
    assert "".join(t["text"] for t in tokens) == expected(question)


async def test_a_prefill_worker_killed_mid_prompt_leaves_the_request_to_another(settings):
    settings = settings.replace(ack_wait_s=1.0)
    async with running_stack(settings, fake(settings, "prefill", delay=60), fake(settings, "decode")) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            answer = asyncio.create_task(client.complete([{"role": "user", "content": QUESTION}], max_tokens=300))
            assert await eventually(lambda: stack.prefill.worker._active)
            other = await spare(settings, "prefill", fake(settings, "prefill"))
            try:
                await die(stack.prefill)
                result = await asyncio.wait_for(answer, 30)
            finally:
                await other.stop(1.0)
    assert result.done, result.error
    assert result.text == expected(QUESTION)
    assert stack.decode.engine.started == 1


async def test_a_prefill_worker_killed_after_publishing_the_decode_job_gets_it_decoded_once(settings):
    """Killed between publishing the decode job and acking its request: the request is served
    again, and the second decode job is the first one's duplicate (same Nats-Msg-Id), so it is
    not decoded twice."""
    settings = settings.replace(ack_wait_s=1.0)
    async with running_stack(settings, fake(settings, "prefill"), fake(settings, "decode", delay=0.01)) as stack, \
            bus_client(settings) as nc:
        seen = await count_tokens(nc, stack.subjects)
        served = stack.prefill.worker.service.serve
        published = asyncio.Event()

        async def serve_then_hang(job, emit):  # dies before it can ack
            await served(job, emit)
            published.set()
            await asyncio.Event().wait()
        stack.prefill.worker.service.serve = serve_then_hang
        async with await EdgeClient.connect(stack.url) as client:
            answer = asyncio.create_task(frames_of(client, QUESTION, max_tokens=300))
            await asyncio.wait_for(published.wait(), 10)
            await die(stack.prefill)
            other = await spare(settings, "prefill", fake(settings, "prefill"))
            try:
                frames = await asyncio.wait_for(answer, 30)
                await eventually(lambda: other.worker.counters.served == 1)
            finally:
                await other.stop(1.0)
    assert_whole_answer(frames)
    assert stack.decode.engine.started == 1, "the decode job was served twice"
    # the first token came from both prefills (the edge showed it once); nothing else twice
    assert [seq for (_, seq), n in seen.items() if n > 1] == [0]


@pytest.mark.parametrize("grace_s", [30.0, 0.2], ids=["finishes-in-the-drain", "hands-over-after-the-drain"])
async def test_a_stopped_decode_worker_finishes_or_hands_over_what_it_holds(settings, grace_s):
    """What SIGTERM does (`run_worker` calls `stop` with GROKSTACK_DRAIN_TIMEOUT_S): stop taking
    work, let running answers finish within the deadline, hand the rest to another worker."""
    settings = settings.replace(ack_wait_s=1.0)
    async with running_stack(settings, fake(settings, "prefill"), fake(settings, "decode", delay=0.02)) as stack, \
            bus_client(settings) as nc:
        seen = await count_tokens(nc, stack.subjects)
        other = await spare(settings, "decode", fake(settings, "decode", delay=0.02))
        try:
            async with await EdgeClient.connect(stack.url) as client:
                frames, stopping = [], None
                async for frame in client.stream([{"role": "user", "content": QUESTION}], max_tokens=300):
                    frames.append(frame)
                    if stopping is None and sum(f["type"] == "token" for f in frames) == 5:
                        victim = next(w for w in (stack.decode, other) if w.worker._active)
                        stopping = asyncio.create_task(victim.worker.stop(grace_s))
                        # while it drains, new work goes to the other worker
                        later = await asyncio.wait_for(
                            client.complete([{"role": "user", "content": "a later one"}], max_tokens=50), 30)
                        assert later.text == expected("a later one")
                await asyncio.wait_for(stopping, grace_s + 10)
        finally:
            await other.stop(1.0)
    assert_whole_answer(frames)
    survivor = other if victim is stack.decode else stack.decode
    if grace_s > 1:
        assert victim.worker.counters.served == 1  # it finished the answer itself
    else:
        assert survivor.worker.counters.served == 2  # the later one and the handed-over answer
    assert [key for key, n in seen.items() if n > 1] == []


async def test_a_nats_server_restart_mid_answer_ends_every_request_cleanly(settings, tmp_path: Path):
    """The broker restarts while answers stream: every process reconnects by itself; a request
    in flight completes (or ends with a retryable error, never hangs) and new ones are served."""
    server = EmbeddedNats(tmp_path / "nats")
    url = server.start()
    settings = settings.replace(nats_url=url, nats_credentials=str(server.credentials_file), ack_wait_s=1.0)
    try:
        async with running_stack(settings, fake(settings, "prefill"), fake(settings, "decode", delay=0.02)) as stack:
            async with await EdgeClient.connect(stack.url) as client:
                questions = [f"{QUESTION} number {i}" for i in range(4)]
                answers = [asyncio.create_task(frames_of(client, q, max_tokens=300))
                           for q in questions]
                await eventually(lambda: stack.decode.worker._active)
                server.proc.kill()  # as a crash: no goodbye to the clients
                server.proc.wait()
                await asyncio.sleep(0.5)
                server.port = int(url.rsplit(":", 1)[1])
                server.start()
                results = await asyncio.wait_for(asyncio.gather(*answers), 60)
                for question, frames in zip(questions, results, strict=True):
                    if frames[-1]["type"] == "error":
                        assert frames[-1]["retryable"], frames[-1]
                    else:
                        assert_whole_answer(frames, question)
                after = await asyncio.wait_for(
                    client.complete([{"role": "user", "content": "after the restart"}], max_tokens=50), 30)
                assert after.text == expected("after the restart"), after.error
    finally:
        server.stop()


async def test_events_lost_with_a_dying_broker_are_sent_again_after_the_reconnect(settings, tmp_path: Path):
    """What was in the worker's socket when the server died never reached the capture either; the
    worker still has it and sends it again once reconnected (here: recorded, never published)."""
    server = EmbeddedNats(tmp_path / "nats")
    url = server.start()
    settings = settings.replace(nats_url=url, nats_credentials=str(server.credentials_file))
    subjects = settings.bus.subjects
    recent = RecentEvents()
    for rid in ("r1", "r2"):
        event = TokenEvent(request_id=rid, seq=0, text="x", token_ids=[120])
        recent.record(rid, subjects.events("local", "edge1", rid), encode(event))
    recent.end("r2")  # an answer that just ended: its last events matter most
    try:
        async with bus_client(settings, "ops") as ops, bus_client(settings, "decode") as worker:
            await provision(settings)
            resending = asyncio.create_task(resend_after_reconnects(worker, recent, 0.05))
            server.proc.kill()
            server.proc.wait()
            server.port = int(url.rsplit(":", 1)[1])
            server.start()

            async def captured() -> bool:  # the capture stream has both, whoever listened
                try:
                    return all([(await sent_so_far(ops.jetstream(), subjects,
                                                   subjects.events("local", "edge1", rid))).token_ids
                                for rid in ("r1", "r2")])
                except Exception:  # JetStream still starting
                    return False
            assert await eventually(captured, timeout=15)
            resending.cancel()
    finally:
        server.stop()
