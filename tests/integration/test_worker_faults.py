"""Faults injected for real into the running stack. This module runs last (and is named so):
it kills the stack's own decode worker.

A decode worker SIGKILLed mid-answer: JetStream hands its unacknowledged job to a spare decode
worker, which continues from the tokens the client already had (from the capture stream), so
the client gets every token once, in order, and the same greedy text as an uninterrupted run."""

from __future__ import annotations

import nats
import pytest

from bus.codec import decode
from bus.messages import Heartbeat
from edge.client import EdgeClient
from tests.integration.conftest import kill_group, spawn_worker, wait_for_heartbeat

pytestmark = pytest.mark.engine
STORY = [{"role": "user", "content": "Tell me a long story about a clockmaker who builds a mechanical bird."}]
TOKENS = 120


@pytest.fixture(scope="module")
def spare_decode(vllm_stack):
    settings = vllm_stack.settings.replace(worker_id=f"{vllm_stack.settings.worker_id}-spare")
    proc = spawn_worker(vllm_stack, settings, "decode")
    try:
        wait_for_heartbeat(settings, "decode")
        yield settings.worker_id, proc
    finally:
        kill_group(proc)


async def busy_decode_worker(vllm_stack) -> str:
    """The worker id of the decode worker generating right now (from its heartbeat)."""
    nc = await nats.connect(vllm_stack.settings.nats_url)
    try:
        sub = await nc.subscribe(vllm_stack.subjects.heartbeat(vllm_stack.settings.region, "decode"))
        while True:
            beat = decode((await sub.next_msg(timeout=30)).data, Heartbeat)
            if beat.active:
                return beat.worker_id
    finally:
        await nc.close()


async def test_a_sigkilled_decode_worker_hands_its_answer_to_a_spare_with_no_token_lost_or_repeated(
        vllm_stack, spare_decode):
    spare_id, spare_proc = spare_decode
    async with await EdgeClient.connect(vllm_stack.url) as client:
        uninterrupted = await client.complete(STORY, max_tokens=TOKENS, temperature=0)
        assert uninterrupted.done, uninterrupted.error
        frames, killed = [], None
        async for frame in client.stream(STORY, max_tokens=TOKENS, temperature=0):
            frames.append(frame)
            if killed is None and sum(f["type"] == "token" for f in frames) == 10:
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
