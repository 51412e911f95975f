"""Direct jobs, capture, rerun and trace against the real stack: vLLM prefill and decode
processes with the bundled model, real NATS/JetStream and Redis."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from bus import capture
from bus.capture import Selection
from bus.client import JobClient
from bus.credentials import BusAuth
from bus.messages import ChatMessage, DecodeJob, TokenEvent
from services import replay, trace
from tests.integration.conftest import DIRECT, MAX_TOKENS

pytestmark = pytest.mark.engine


async def captured(stack, request_id: str) -> list:
    nc = await nats.connect(stack.settings.bus.nats_url, **BusAuth.of(stack.settings.bus, "ops").connect_options())
    try:
        return [i async for i in capture.read(nc.jetstream(), stack.subjects, stack.settings.bus.region,
                                              Selection(request_id=request_id))]
    finally:
        await nc.drain()


async def test_raw_json_job_from_a_plain_nats_client_streams_the_reference_answer(vllm_stack, reference):
    prefix = vllm_stack.settings.bus.subject_prefix
    nc = await nats.connect(vllm_stack.settings.bus.nats_url,
                            **BusAuth.of(vllm_stack.settings.bus, "ops").connect_options())
    events: list[dict] = []
    done = asyncio.Event()

    async def on_event(msg):
        events.append(json.loads(msg.data))
        if events[-1]["type"] != "token":
            done.set()

    await nc.subscribe(f"{prefix}.evt.local.my-service.raw-1", cb=on_event)
    job = {"type": "chat_request", "v": 1, "request_id": "raw-1", "region": "local",
           "priority": "standard", "tenant": "public", "messages": DIRECT,
           "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0.0},
           "reply_to": f"{prefix}.evt.local.my-service.raw-1"}
    await nc.jetstream().publish(f"{prefix}.req.local.standard.public.raw-1", json.dumps(job).encode(),
                                 headers={"Nats-Msg-Id": "raw-1"})
    await asyncio.wait_for(done.wait(), 120)
    await nc.drain()
    assert events[-1]["type"] == "final", events[-1]
    assert "".join(e["text"] for e in events if e["type"] == "token") == reference["direct"].text


async def test_one_generation_for_two_submissions_of_the_same_key(vllm_stack, reference):
    url, prefix = vllm_stack.settings.bus.nats_url, vllm_stack.settings.bus.subject_prefix
    messages = [ChatMessage(**m) for m in DIRECT]
    auth = BusAuth.of(vllm_stack.settings.bus, "ops")
    async with await JobClient.connect(url, prefix, auth=auth) as a, \
            await JobClient.connect(url, prefix, auth=auth) as b:
        jobs = [await c.submit(c.request(messages, max_tokens=MAX_TOKENS, temperature=0.0,
                                         idempotency_key="same-key-1")) for c in (a, b)]
        first, second = await asyncio.gather(*(job.result() for job in jobs))
    assert first.ok and second.joined
    assert first.text == second.text == reference["direct"].text
    items = await captured(vllm_stack, "same-key-1")
    assert sum(isinstance(i.message, DecodeJob) for i in items) == 1
    assert sum(isinstance(i.message, TokenEvent) and i.message.seq == 0 for i in items) == 1


async def test_rerun_of_a_greedy_request_is_identical_and_a_changed_temperature_shows(vllm_stack):
    url, prefix = vllm_stack.settings.bus.nats_url, vllm_stack.settings.bus.subject_prefix
    async with await JobClient.connect(url, prefix, auth=BusAuth.of(vllm_stack.settings.bus, "ops")) as client:
        original = await client.generate([ChatMessage(role="user", content="Name three colours.")],
                                         max_tokens=MAX_TOKENS, temperature=0.0)
        items = await captured(vllm_stack, original.request_id)
        same = [r async for r in replay.rerun(client, items, {})]
        changed = [r async for r in replay.rerun(client, items, {"temperature": 1.5, "seed": 7})]
    assert same[0].identical, same[0].report()
    assert not changed[0].identical, changed[0].report()
    assert "DIFFERENT" in changed[0].report()


async def test_trace_of_a_real_request_shows_the_kv_transfer(vllm_stack, reference):
    url, prefix = vllm_stack.settings.bus.nats_url, vllm_stack.settings.bus.subject_prefix
    async with await JobClient.connect(url, prefix, auth=BusAuth.of(vllm_stack.settings.bus, "ops")) as client:
        done = await client.generate([ChatMessage(role="user", content="Where is Lisbon?")],
                                     max_tokens=MAX_TOKENS, temperature=0.0)
    text = trace.render(done.request_id, trace.timeline(await captured(vllm_stack, done.request_id),
                                                        done.request_id))
    for phrase in ("published to", "prefill done", "MB in", "first token", "prompt tokens loaded",
                   "final: "):
        assert phrase in text, (phrase, text)


async def test_publish_command_with_a_batch_file_against_the_real_stack(vllm_stack, reference, tmp_path):
    from tests.pipeline.test_cli_publish import grokstack

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({"messages": DIRECT, "max_tokens": MAX_TOKENS,
                                          "temperature": 0.0, "priority": "batch"})
                              for _ in range(2)) + "\n")
    code, _, err = await grokstack(vllm_stack.settings, "publish", "--file", str(jobs), timeout=300)
    results = [json.loads(line) for line in (tmp_path / "jobs.results.jsonl").read_text().splitlines()]
    assert code == 0, err
    assert [r["text"] for r in results] == [reference["direct"].text] * 2
    assert "2/2" in err
