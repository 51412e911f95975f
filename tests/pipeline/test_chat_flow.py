"""The pipeline with a fast fake engine: real NATS/JetStream, real Redis, real edge and workers."""

from __future__ import annotations

import asyncio

import nats
import pytest

from edge.client import EdgeClient
from services.lab.fake_engine import FakeEngine, reply_for
from kv_store.block_store import BlockStore
from tests.pipeline.harness import bus_client, running_stack


def engines(settings, delay: float = 0.0):
    store = BlockStore(settings.kv.redis_url, 60)
    return (FakeEngine("prefill", store=store, key_prefix=settings.kv.kv_key_prefix),
            FakeEngine("decode", token_delay_s=delay, store=store, key_prefix=settings.kv.kv_key_prefix))


def expected(content: str) -> str:
    return reply_for(f"<|user|>{content}\n<|assistant|>".encode()).decode()


async def test_chat_streams_tokens_in_order_and_reports_usage(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            frames = [f async for f in client.stream([{"role": "user", "content": "hello there"}],
                                                     max_tokens=100)]
    assert frames[0]["type"] == "accepted"
    tokens = [f for f in frames if f["type"] == "token"]
    assert [f["seq"] for f in tokens] == list(range(len(tokens)))
    assert "".join(f["text"] for f in tokens) == expected("hello there")
    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == len(tokens)
    assert done["usage"]["ttft_ms"] > 0 and done["usage"]["total_ms"] >= done["usage"]["ttft_ms"]


async def test_several_requests_in_flight_on_one_connection(settings):
    async with running_stack(settings, *engines(settings, delay=0.002)) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            contents = [f"question number {i}" for i in range(6)]
            results = await asyncio.gather(*(
                client.complete([{"role": "user", "content": c}], max_tokens=200) for c in contents))
    assert [r.text for r in results] == [expected(c) for c in contents]
    assert all(r.done and r.done["finish_reason"] == "stop" for r in results)


async def test_a_websocket_chat_for_an_unknown_region_is_refused_at_once(settings):
    """The websocket door checks the region as the HTTP door does (edge/intake.py): a region the
    edge never heard of gets an error frame straight away, nothing is published, and the
    connection goes on serving."""
    async with running_stack(settings, *engines(settings)) as stack, bus_client(settings) as nc:
        published = await nc.subscribe(stack.subjects.all_work("req"))
        async with await EdgeClient.connect(stack.url) as client:
            # a guard against waiting for the request's timeout (300 s), not a speed measurement
            frames = await asyncio.wait_for(_frames(client, "where is everyone", region="mars"), 30)
            assert [f["type"] for f in frames] == ["error"]
            error = frames[0]
            assert error["code"] == "invalid_request" and "mars" in error["message"]
            assert "known regions: local" in error["message"] and error["retryable"] is False
            frames = await _frames(client, "and here?")
            assert frames[-1]["type"] == "done" and "".join(
                f["text"] for f in frames if f["type"] == "token") == expected("and here?")
        # no request for that region was ever put on the bus: only the one served locally
        assert (await published.next_msg(timeout=5)).subject.startswith(f"{stack.subjects.prefix}.req.local.")
        with pytest.raises(nats.errors.TimeoutError):
            await published.next_msg(timeout=0.5)


async def _frames(client: EdgeClient, content: str, **params) -> list[dict]:
    return [f async for f in client.stream([{"role": "user", "content": content}], max_tokens=100, **params)]
