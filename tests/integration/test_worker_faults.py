"""Faults injected for real into the running stack. This module runs last (and is named so):
it kills the stack's own decode worker.

A decode worker SIGKILLed mid-answer: JetStream hands its unacknowledged job to a spare decode
worker, which continues from the tokens the client already had (from the capture stream), so
the client gets every token once, in order, and the same greedy text as an uninterrupted run.
A decode worker SIGTERMed mid-answer (a deploy) finishes the answer, then exits. A decode worker
whose vLLM engine core is SIGKILLed mid-answer notices, hands the job back at once (another
worker finishes the answer, nothing is dead-lettered), says `failed` in a heartbeat and exits
with EXIT_ENGINE_DEAD. Redis crashing and coming back empty, or staying down, changes no answer:
the KV is recomputed."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import nats
import psutil
import pytest
import redis

from bus.codec import decode
from bus.credentials import BusAuth
from bus.messages import Heartbeat
from edge.client import EdgeClient
from inference.worker import EXIT_ENGINE_DEAD
from services.embedded import EmbeddedRedis
from services.supervisor import kill_group
from tests.integration.conftest import spawn_worker, wait_for_heartbeat
from tests.integration.test_vllm_stack import chat, unique_system

pytestmark = pytest.mark.engine
STORY = [{"role": "user", "content": "Tell me a long story about a clockmaker who builds a mechanical bird."}]
TOKENS = 120
KILL_AT = 70  # tokens streamed when the decode worker is killed: its saved answer blocks move on


@pytest.fixture(scope="module")
def spare_decode(vllm_stack):
    settings = vllm_stack.settings.replace(worker_id=f"{vllm_stack.settings.bus.worker_id}-spare")
    proc = spawn_worker(vllm_stack, settings, "decode")
    try:
        wait_for_heartbeat(settings, "decode", proc)
        yield settings.bus.worker_id, proc
    finally:
        kill_group(proc)


async def busy_decode_worker(vllm_stack) -> str:
    """The worker id of the decode worker generating right now (from its heartbeat)."""
    nc = await nats.connect(vllm_stack.settings.bus.nats_url,
                            **BusAuth.of(vllm_stack.settings.bus, "ops").connect_options())
    try:
        sub = await nc.subscribe(vllm_stack.subjects.heartbeat(vllm_stack.settings.bus.region, "decode"))
        while True:
            beat = decode((await sub.next_msg(timeout=30)).data, Heartbeat)
            if beat.active:
                return beat.worker_id
    finally:
        await nc.close()


async def test_a_sigkilled_decode_worker_hands_its_answer_to_a_spare_with_no_token_lost_or_repeated(
        vllm_stack, spare_decode, redis_server):
    spare_id, spare_proc = spare_decode
    async with await EdgeClient.connect(vllm_stack.url) as client:
        uninterrupted = await client.complete(STORY, max_tokens=TOKENS, temperature=0)
        assert uninterrupted.done, uninterrupted.error
        # only what the killed worker saves may be loaded by its successor
        store = redis.Redis.from_url(redis_server.ops_url)
        for key in store.scan_iter(f"{vllm_stack.settings.kv.kv_key_prefix}:blk:*"):
            store.delete(key)
        frames, killed, times = [], None, []
        async for frame in client.stream(STORY, max_tokens=TOKENS, temperature=0):
            frames.append(frame)
            times.append(time.monotonic())
            if killed is None and sum(f["type"] == "token" for f in frames) == KILL_AT:
                busy = await busy_decode_worker(vllm_stack)
                killed = spare_proc if busy == spare_id else vllm_stack.procs["decode"]
                kill_group(killed)
    assert frames[-1]["type"] == "done", frames[-1]
    tokens = [f for f in frames if f["type"] == "token"]
    assert [t["seq"] for t in tokens] == list(range(len(tokens))), "a token was lost or repeated"
    assert "".join(t["text"] for t in tokens) == uninterrupted.text
    assert frames[-1]["usage"]["completion_tokens"] == uninterrupted.done["usage"]["completion_tokens"]
    survivor_log = vllm_stack.logs / ("decode.log" if killed is spare_proc else f"{spare_id}.log")
    assert "continuing a migrated job" in survivor_log.read_text()
    # the survivor loaded the blocks of the tokens generated before the kill (the killed worker
    # saved them as they filled), not only the prompt's
    prompt_blocks = uninterrupted.done["kv"]["loaded_tokens"]
    assert frames[-1]["kv"]["loaded_tokens"] >= prompt_blocks + 32, (frames[-1]["kv"], prompt_blocks)
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
    print(f"migration: longest pause between tokens {gaps[-1] * 1000:.0f} ms, "
          f"median {gaps[len(gaps) // 2] * 1000:.0f} ms")


async def test_a_sigtermed_decode_worker_finishes_its_answer_then_exits(vllm_stack, spare_decode):
    """What a deploy does: the worker stops taking work, finishes what it holds within
    GROKSTACK_DRAIN_TIMEOUT_S, and exits 0; meanwhile a running spare takes the new work."""
    procs = {vllm_stack.settings.bus.worker_id: vllm_stack.procs["decode"], spare_decode[0]: spare_decode[1]}
    settings = vllm_stack.settings.replace(worker_id=f"{vllm_stack.settings.bus.worker_id}-spare2")
    # the stack's teardown stops it: it may be the last decode worker the next test has
    procs[settings.bus.worker_id] = vllm_stack.procs["decode-spare2"] = spawn_worker(vllm_stack, settings, "decode")
    await asyncio.to_thread(wait_for_heartbeat, settings, "decode", procs[settings.bus.worker_id])
    async with await EdgeClient.connect(vllm_stack.url) as client:
        uninterrupted = await client.complete(STORY, max_tokens=TOKENS, temperature=0)
        frames, stopped = [], None
        async for frame in client.stream(STORY, max_tokens=TOKENS, temperature=0):
            frames.append(frame)
            if stopped is None and sum(f["type"] == "token" for f in frames) == 10:
                stopped = procs[await busy_decode_worker(vllm_stack)]
                stopped.send_signal(signal.SIGTERM)
                later = await client.complete([{"role": "user", "content": "Say hi."}], max_tokens=8)
                assert later.done, later.error  # served by a worker still taking work
    assert frames[-1]["type"] == "done", frames[-1]
    tokens = [f for f in frames if f["type"] == "token"]
    assert [t["seq"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens) == uninterrupted.text
    try:
        assert stopped.wait(vllm_stack.settings.worker.drain_timeout_s + 60) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError("the worker did not exit after its drain") from None


def engine_cores(proc: subprocess.Popen) -> list[psutil.Process]:
    """The worker's vLLM engine core processes (its children that say so in their title)."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            title = child.name() + " " + " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "EngineCore" in title:
            found.append(child)
    return found


async def test_a_decode_worker_whose_engine_core_dies_hands_its_answer_over_and_exits(vllm_stack):
    settings = vllm_stack.settings.replace(worker_id=f"{vllm_stack.settings.bus.worker_id}-dying")
    mine = vllm_stack.procs["decode-dying"] = spawn_worker(vllm_stack, settings, "decode")
    await asyncio.to_thread(wait_for_heartbeat, settings, "decode", mine)
    assert engine_cores(mine), [c.name() for c in psutil.Process(mine.pid).children(recursive=True)]
    # every decode worker of the stack by worker id (tests before may have stopped some)
    workers = {vllm_stack.settings.bus.worker_id if c.name == "decode" else c.name: c.proc
               for c in vllm_stack.supervisor.children() if c.running and c.name != "prefill" and c.name != "edge"}
    nc = await nats.connect(vllm_stack.settings.bus.nats_url,
                            **BusAuth.of(vllm_stack.settings.bus, "ops").connect_options())
    failed_beats: list[Heartbeat] = []

    async def heard(msg) -> None:
        beat = decode(msg.data, Heartbeat)
        if beat.state == "failed":
            failed_beats.append(beat)
    try:
        await nc.subscribe(vllm_stack.subjects.heartbeat(vllm_stack.settings.bus.region, "decode"), cb=heard)
        dlq = vllm_stack.subjects.stream("dlq", vllm_stack.settings.bus.region)
        dead_before = (await nc.jetstream().stream_info(dlq)).state.messages
        async with await EdgeClient.connect(vllm_stack.url) as client:
            uninterrupted = await client.complete(STORY, max_tokens=TOKENS, temperature=0)
            assert uninterrupted.done, uninterrupted.error
            frames, victim, victim_id = [], None, None
            async for frame in client.stream(STORY, max_tokens=TOKENS, temperature=0):
                frames.append(frame)
                if victim is None and sum(f["type"] == "token" for f in frames) == 10:
                    victim_id = await busy_decode_worker(vllm_stack)
                    victim = workers[victim_id]
                    cores = engine_cores(victim)
                    assert cores, f"no engine core under the worker {victim_id}"
                    for core in cores:
                        core.kill()
        try:  # bounded: it must notice by itself, not wait for a lease to lapse
            code = await asyncio.to_thread(victim.wait, 120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker {victim_id} whose engine died did not exit") from None
        dead_after = (await nc.jetstream().stream_info(dlq)).state.messages
    finally:
        await nc.close()
    assert code == EXIT_ENGINE_DEAD
    assert frames[-1]["type"] == "done", frames[-1]
    tokens = [f for f in frames if f["type"] == "token"]
    assert [t["seq"] for t in tokens] == list(range(len(tokens))), "a token was lost or repeated"
    assert "".join(t["text"] for t in tokens) == uninterrupted.text
    assert dead_after == dead_before, "a job was dead-lettered because a worker's engine died"
    assert any(b.worker_id == victim_id for b in failed_beats), failed_beats


def crash_and_restart(server: EmbeddedRedis, down_s: float = 1.0) -> None:
    """SIGKILL (no final save) and the same server again on the same port, empty."""
    url = server.url
    server.proc.kill()
    server.proc.wait()
    time.sleep(down_s)
    server.port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert server.start() == url


async def test_redis_crashing_or_staying_down_changes_no_answer(vllm_stack, redis_server):
    messages = [unique_system("Be concise."), {"role": "user", "content": "What is snow?"}]
    before = await chat(vllm_stack, messages)
    warm = await chat(vllm_stack, messages)
    assert warm.text == before.text and warm.done["usage"]["cached_prompt_tokens"] > 0
    crash_and_restart(redis_server)
    after = await chat(vllm_stack, messages)  # the KV went with the server: recomputed
    assert after.text == before.text and after.done["usage"]["cached_prompt_tokens"] == 0
    redis_server.proc.kill()
    redis_server.proc.wait()
    try:
        down = await chat(vllm_stack, messages)  # no KV store at all for this one
    finally:
        crash_and_restart(redis_server, 0.0)
    assert down.text == before.text, down.error
