"""Bad frames get an error naming the problem; nothing is published; the connection lives on."""

from __future__ import annotations

import json

import nats
import pytest

from edge.client import EdgeClient
from tests.pipeline.harness import ops, running_stack
from tests.pipeline.test_chat_flow import engines, expected

GOOD = {"type": "chat", "messages": [{"role": "user", "content": "hi"}]}

BAD_FRAMES = [
    ("not json at all", "invalid_json", "not valid JSON"),
    (json.dumps([1, 2]), "invalid_frame", '"type"'),
    (json.dumps({"type": "shout"}), "invalid_frame", "unknown frame type 'shout'"),
    (json.dumps({"type": "chat"}), "invalid_frame", "missing required field `messages`"),
    (json.dumps({**GOOD, "max_tokens": "ten"}), "invalid_frame", "$.max_tokens"),
    (json.dumps({**GOOD, "messages": [{"role": "robot", "content": "x"}]}), "invalid_frame", "$.messages[0].role"),
    (json.dumps({**GOOD, "temprature": 0.5}), "invalid_frame", "temprature"),
    (json.dumps({**GOOD, "max_tokens": 0}), "invalid_request", "max_tokens"),
    (json.dumps({**GOOD, "max_tokens": 100000}), "invalid_request", "max_tokens"),
    (json.dumps({**GOOD, "temperature": 3.5}), "invalid_request", "temperature"),
    (json.dumps({**GOOD, "top_p": 0}), "invalid_request", "top_p"),
    (json.dumps({**GOOD, "messages": []}), "invalid_request", "at least one message"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": "   "}]}), "invalid_request", "empty"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 70_000}]}), "invalid_request", "characters"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": "x"}] * 300}), "invalid_request", "messages"),
    (json.dumps({**GOOD, "stop": ["a"] * 9}), "invalid_request", "stop"),
    (json.dumps({**GOOD, "priority": "urgent"}), "invalid_frame", "$.priority"),
    (json.dumps({"type": "cancel", "id": "nope"}), "unknown_id", "nope"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": "y" * 300_000}]}), "frame_too_large", "limit"),
]


async def last_seq(nc, settings) -> int:
    info = await nc.jetstream().stream_info(settings.bus.subjects.stream("req", settings.bus.region))
    return info.state.last_seq


async def test_each_bad_frame_gets_a_named_error_and_nothing_is_published(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        nc = await nats.connect(settings.bus.nats_url, **ops(settings).connect_options())
        before = await last_seq(nc, settings)
        async with await EdgeClient.connect(stack.url) as client:
            for raw, code, words in BAD_FRAMES:
                await client.send_raw(raw)
                # none of these frames opened a request the client waits on: the error is unrouted
                frame = await client.unrouted.get()
                assert frame["type"] == "error", raw[:80]
                assert frame["code"] == code, (raw[:80], frame)
                assert words in frame["message"], (raw[:80], frame["message"])
            # the connection is still up and serves a good request
            result = await client.complete([{"role": "user", "content": "still here"}])
        assert result.text == expected("still here")
        assert await last_seq(nc, settings) == before + 1  # only the good request went out
        await nc.close()


async def test_duplicate_id_and_in_flight_limit(settings):
    settings = settings.replace(max_inflight_per_connection=2)
    async with running_stack(settings, *engines(settings, delay=0.05)) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            msg = [{"role": "user", "content": "a long enough question to take a while"}]
            first = client.stream(msg, id="same")
            assert (await first.__anext__())["type"] == "accepted"
            dup = [f async for f in client.stream(msg, id="same")]
            assert dup[-1]["code"] == "duplicate_id"
            second = client.stream(msg, id="two")
            assert (await second.__anext__())["type"] == "accepted"
            third = [f async for f in client.stream(msg, id="three")]
            assert third[-1]["code"] == "too_many_requests" and third[-1]["retryable"] is True
            await first.aclose()
            await second.aclose()


@pytest.mark.parametrize("max_len", [64])
async def test_prompt_that_does_not_fit_the_context_is_refused_by_prefill(settings, max_len):
    from services.lab.fake_engine import FakeEngine
    prefill = FakeEngine("prefill", max_model_len=max_len)
    async with running_stack(settings, prefill, FakeEngine("decode")) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            result = await client.complete([{"role": "user", "content": "z" * 40}], max_tokens=32)
    assert result.error["code"] == "prompt_too_long"
    assert "context of 64 tokens" in result.error["message"]
