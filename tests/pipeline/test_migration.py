"""A decode worker that dies mid-answer: the job goes to another decode worker, which continues
from the tokens the client already has (read from the capture stream), so the client sees every
token once, in order, and the whole answer (real NATS and Redis, fake engines)."""

from __future__ import annotations

import asyncio
from typing import Callable

from collections import Counter

from bus.codec import decode_event
from edge.client import EdgeClient
from inference import metrics
from services.lab.fake_engine import FakeEngine
from kv_store.block_store import BlockStore
from services.processes import start_worker
from tests.pipeline.harness import bus_client, eventually, running_stack
from tests.pipeline.test_chat_flow import expected


async def die(running) -> None:
    """As a SIGKILL looks from outside: the connection drops, nothing is acked or nak'ed."""
    await running.nc.close()
    running.task.cancel()
    await asyncio.gather(running.task, return_exceptions=True)


def engines_on_one_store(settings) -> Callable[[str], FakeEngine]:
    """New engines on one KV store (a dead worker's successor loads what it saved); decode ones
    slow enough for an answer to be cut in the middle."""
    store = BlockStore(settings.kv.redis_url, 60)
    return lambda role: FakeEngine(role, token_delay_s=0.05 if role == "decode" else 0.0, store=store,
                                   key_prefix=settings.kv.kv_key_prefix)


async def test_a_dead_decode_workers_request_continues_on_another_with_no_token_lost_or_repeated(settings):
    settings = settings.replace(ack_wait_s=1.0)
    engine = engines_on_one_store(settings)
    question = "a long answer that will outlive its first decode worker"
    prefill = engine("prefill")
    async with running_stack(settings, prefill, engine("decode")) as stack, bus_client(settings) as nc:
        published: Counter[int] = Counter()  # event seq -> times it went over the bus

        async def count(msg) -> None:
            published[decode_event(msg.data).seq] += 1
        await nc.subscribe(f"{settings.bus.subject_prefix}.evt.>", cb=count)
        spare = await start_worker(settings.replace(worker_id=f"{settings.bus.worker_id}-spare"), "decode",
                                   engine("decode"))
        try:
            async with await EdgeClient.connect(stack.url) as client:
                frames, victim = [], None
                async for frame in client.stream([{"role": "user", "content": question}], max_tokens=300):
                    frames.append(frame)
                    tokens = sum(f["type"] == "token" for f in frames)
                    if tokens == 8 and victim is None:
                        victim = next(w for w in (stack.decode, spare) if w.worker._active)
                        await die(victim)
            survivor = spare if victim is stack.decode else stack.decode
            assert frames[-1]["type"] == "done", frames[-1]
            tokens = [f for f in frames if f["type"] == "token"]
            assert [t["seq"] for t in tokens] == list(range(len(tokens)))
            assert "".join(t["text"] for t in tokens) == expected(question)
            assert frames[-1]["usage"]["completion_tokens"] == len(expected(question))
            await eventually(lambda: survivor.worker.counters.served == 1)
            # the survivor went on from the last token sent instead of generating them again
            assert [seq for seq, n in published.items() if n > 1] == []
        finally:
            if spare is not victim:
                await spare.stop(1.0)


async def test_a_worker_that_lost_its_connection_still_stops_cleanly(settings):
    from tests.pipeline.test_chat_flow import engines
    async with running_stack(settings, *engines(settings)) as stack:
        await die(stack.decode)  # the harness then stops it as any worker is stopped


async def test_a_dead_workers_jobs_move_on_long_before_their_lease_lapses(settings):
    """The survivor watches its peer (inference/peer_watch.py): once the dead worker's connection
    is gone it naks the jobs the dead one's last beat listed. With a 20 s lease, the answer can
    only go on within the 10 s it is given here that way."""
    settings = settings.replace(ack_wait_s=20.0)
    engine = engines_on_one_store(settings)
    question = "an answer that outlives its decode worker by a lease and more"
    prefill = engine("prefill")
    handed_on = metrics.PEER_JOBS_HANDED_ON.labels("decode")
    before = handed_on._value.get()
    async with running_stack(settings, prefill, engine("decode")) as stack:
        spare = await start_worker(settings.replace(worker_id=f"{settings.bus.worker_id}-spare"), "decode",
                                   engine("decode"))
        victim = None
        try:
            async with await EdgeClient.connect(stack.url) as client:
                frames: list[dict] = []

                async def read() -> None:
                    nonlocal victim
                    async for frame in client.stream([{"role": "user", "content": question}], max_tokens=300):
                        frames.append(frame)
                        if sum(f["type"] == "token" for f in frames) == 8 and victim is None:
                            victim = next(w for w in (stack.decode, spare) if w.worker._active)
                            other = spare if victim is stack.decode else stack.decode
                            name = victim.worker.bus.worker_name  # a beat told the other of its job
                            await eventually(lambda: getattr(other.worker._peers.peers.get(name), "leases", ()))  # noqa: B023
                            # its loop answers the other's probes (a probe sent after its last beat)
                            assert await eventually(lambda: (p := other.worker._peers.peers.get(name))  # noqa: B023
                                                    and p.loop_seen_at > p.heard_at)
                            await die(victim)
                await asyncio.wait_for(read(), 10)
        finally:
            if spare is not victim:
                await spare.stop(1.0)
    tokens = [f for f in frames if f["type"] == "token"]
    assert frames[-1]["type"] == "done", frames[-1]
    assert [t["seq"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens) == expected(question)
    assert handed_on._value.get() == before + 1
