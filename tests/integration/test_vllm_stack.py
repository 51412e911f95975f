"""The whole stack with real parts: nats-server (JetStream), a Redis-compatible server, vLLM
with the bundled model in separate prefill and decode processes, and the websocket edge."""

from __future__ import annotations

import asyncio
import json
import uuid

import msgspec
import nats
import pytest
import redis

from bus.codec import decode, encode
from bus.credentials import BusAuth
from bus.messages import DecodeJob, Heartbeat
from bus.signing import Signer
from edge.client import EdgeClient
from kv_store.block_store import TAG_BYTES, seal
from tests.integration.conftest import COPY, LONG, MAX_TOKENS, SHORT, RunningStack, spawn_worker

pytestmark = pytest.mark.engine


def unique_system(words: str) -> dict[str, str]:
    """A system message no other test uses, so the KV cache starts cold for this test."""
    return {"role": "system", "content": f"[{uuid.uuid4().hex}] {words} " * 12}


async def chat(stack: RunningStack, messages, **params):
    async with await EdgeClient.connect(stack.url) as client:
        return await client.complete(messages, **{"temperature": 0.0, "max_tokens": MAX_TOKENS, **params})


async def decode_job_of(stack: RunningStack, messages) -> tuple[DecodeJob, str]:
    """Run a chat and capture the decode job prefill published for it (a core subscriber sees
    what JetStream stores)."""
    nc = await nats.connect(stack.settings.bus.nats_url, **BusAuth.of(stack.settings.bus, "ops").connect_options())
    sub = await nc.subscribe(f"{stack.settings.bus.subject_prefix}.decode.>")
    result = await chat(stack, messages)
    job = decode((await sub.next_msg(timeout=10)).data, DecodeJob)
    await nc.close()
    assert job.request_id == result.request_id and job.kv is not None
    return job, result.text


async def replay_decode(stack: RunningStack, job: DecodeJob, region: str = "local") -> tuple[str, dict]:
    """Publish `job` again under a new id and collect what the decode pool of `region` streams back."""
    request_id = uuid.uuid4().hex
    reply = stack.subjects.events(stack.settings.bus.region, "probe", request_id)
    job = msgspec.structs.replace(job, request_id=request_id, reply_to=reply)
    nc = await nats.connect(stack.settings.bus.nats_url, **BusAuth.of(stack.settings.bus, "ops").connect_options())
    sub = await nc.subscribe(reply)
    await nc.jetstream().publish(stack.subjects.decode(region, job.priority), encode(job))
    text = ""
    while True:
        event = json.loads((await sub.next_msg(timeout=60)).data)
        if event["type"] == "token":
            text += event["text"]
        else:
            await nc.close()
            return text, event


async def test_websocket_chat_streams_the_same_text_as_one_vllm_engine(vllm_stack, reference):
    for name, messages in (("short", SHORT), ("long", LONG)):
        result = await chat(vllm_stack, messages)
        ref = reference[name]
        assert result.error is None, result.error
        assert result.text == ref.text, name
        assert len(result.token_times) > 1  # streamed, not delivered at once
        usage, kv = result.done["usage"], result.done["kv"]
        assert usage["prompt_tokens"] == len(ref.prompt_token_ids)
        # every full 32-token block of the prompt went prefill -> Redis -> decode, and the first
        # tokens of the last block up to a multiple of kv_partial_step (16)
        step = vllm_stack.settings.kv.kv_partial_step
        assert kv["loaded_tokens"] == len(ref.prompt_token_ids) // step * step > 0, name
        assert not kv["recomputed"] and kv["bytes_read"] == kv["bytes_written"] > 0


async def test_speculation_is_on_by_default_changes_no_token_and_the_answer_says_what_it_drafted(
        vllm_stack, reference):
    result = await chat(vllm_stack, COPY)
    assert result.error is None and result.text == reference["copy"].text  # the engine without speculation
    spec = result.done["speculation"]
    assert spec["accepted_tokens"] > 0 and spec["drafted_tokens"] >= spec["accepted_tokens"], spec
    assert sum(n for _, n in result.token_times) > len(result.token_times)  # frames carried several tokens


async def test_second_turn_is_served_from_the_first_turns_prompt_and_answer_kv(vllm_stack, redis_server):
    turn1 = [unique_system("Answer in one sentence."),
             {"role": "user", "content": "Name a large ocean and say why it matters."}]
    first = await chat(vllm_stack, turn1)
    assert first.done["usage"]["cached_prompt_tokens"] == 0
    turn2 = turn1 + [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "And a large desert?"}]
    second = await chat(vllm_stack, turn2)
    assert second.error is None
    history = first.done["usage"]["prompt_tokens"] + first.done["usage"]["completion_tokens"]
    cached = second.done["usage"]["cached_prompt_tokens"]
    # decode saved the answer's blocks as they filled: all of the first turn but its last partial
    # block is loaded (only the prompt's blocks were before, the answer recomputed every turn)
    assert cached >= first.done["usage"]["prompt_tokens"] // 32 * 32 + 32, (cached, history)
    assert cached >= (history - 1) // 32 * 32 - 32, (cached, history)
    # the loaded answer KV gives the answer that computing everything gives
    store = redis.Redis.from_url(redis_server.ops_url)
    for key in store.scan_iter(f"{vllm_stack.settings.kv.kv_key_prefix}:blk:*"):
        store.delete(key)
    recomputed = await chat(vllm_stack, turn2)
    assert recomputed.done["usage"]["cached_prompt_tokens"] == 0 and recomputed.text == second.text


async def test_evicted_kv_is_recomputed_with_the_same_answer(vllm_stack, redis_server):
    messages = [unique_system("Be concise."), {"role": "user", "content": "What is rain?"}]
    cold = await chat(vllm_stack, messages)
    warm = await chat(vllm_stack, messages)
    assert warm.text == cold.text and warm.done["usage"]["cached_prompt_tokens"] > 0
    store = redis.Redis.from_url(redis_server.ops_url)  # the stack's own user may not SCAN or DEL
    deleted = sum(store.delete(k) for k in store.scan_iter(f"{vllm_stack.settings.kv.kv_key_prefix}:blk:*"))
    assert deleted > 0
    again = await chat(vllm_stack, messages)
    assert again.text == cold.text
    assert again.done["usage"]["cached_prompt_tokens"] == 0


async def test_decode_recomputes_when_the_handles_blocks_are_gone(vllm_stack, redis_server):
    job, text = await decode_job_of(vllm_stack, [unique_system("Reply briefly."),
                                                 {"role": "user", "content": "Describe a cat."}])
    redis.Redis.from_url(redis_server.ops_url).delete(*job.kv.keys)
    replayed, final = await replay_decode(vllm_stack, job)
    first_token_text = text[: len(text) - len(replayed)]
    assert first_token_text and first_token_text + replayed == text  # same answer from token 1 on
    assert final["type"] == "final" and final["kv"]["recomputed"] is True
    assert final["kv"]["loaded_tokens"] == 0 and final["usage"]["cached_prompt_tokens"] == 0


async def test_a_prompt_handed_to_decode_unprefilled_gets_the_whole_answer_from_decode(vllm_stack):
    """What a prefill worker sends for a short prompt (EngineConfig.decode_prefill_max_tokens): no
    first token, no KV handle. The real decode engine computes the prompt in its batch and streams
    the whole answer from its first token, the same greedy text as prefill + decode gave."""
    job, text = await decode_job_of(vllm_stack, [unique_system("Reply briefly."),
                                                 {"role": "user", "content": "Describe a bird."}])
    handed = msgspec.structs.replace(job, first_token_id=None, kv=None, first_seq=0)
    replayed, final = await replay_decode(vllm_stack, handed)
    assert replayed == text
    assert final["type"] == "final" and final["finish_reason"] in ("stop", "length")
    assert final["timings"]["prefill_ms"] > 0 and not final["kv"]["recomputed"]
    # its prompt's blocks, written when prefill computed it, were found: decode loaded them
    assert final["usage"]["cached_prompt_tokens"] == final["kv"]["loaded_tokens"] > 0


async def test_decode_really_uses_the_loaded_kv(vllm_stack, redis_server):
    job, text = await decode_job_of(vllm_stack, [unique_system("Reply briefly."),
                                                 {"role": "user", "content": "Describe a dog."}])
    store = redis.Redis.from_url(redis_server.ops_url)
    signer = Signer.from_file(vllm_stack.settings.bus.secret_file)  # sealed as the stack would: they pass the check
    for key in job.kv.keys:  # same size, wrong numbers: only a reader that uses them notices
        store.set(key, seal(signer, key, bytes(len(store.get(key)) - TAG_BYTES)), ex=600)
    replayed, final = await replay_decode(vllm_stack, job)
    # the handle's full blocks, and the partial block after them (fewer than a block's tokens)
    assert 0 <= final["kv"]["loaded_tokens"] - job.kv.num_tokens < 32 and not final["kv"]["recomputed"]
    assert replayed != text[len(text) - len(replayed):]


async def test_interactive_request_is_served_before_a_batch_backlog(vllm_stack):
    batch_clients = [await EdgeClient.connect(vllm_stack.url) for _ in range(2)]  # back-office jobs
    user_client = await EdgeClient.connect(vllm_stack.url)  # a person in the chat
    order: list[str] = []

    async def run(client: EdgeClient, name: str, priority: str) -> None:
        async for frame in client.stream([{"role": "user", "content": f"Count to five. ({name})"}],
                                         id=name, priority=priority, max_tokens=16, temperature=0.0):
            assert frame["type"] != "error", frame
            if frame["type"] == "token" and frame["seq"] == 0:
                order.append(name)

    backlog = [asyncio.create_task(run(batch_clients[i % 2], f"batch{i}", "batch")) for i in range(12)]
    await asyncio.sleep(0.2)
    urgent = asyncio.create_task(run(user_client, "urgent", "interactive"))
    await asyncio.gather(*backlog, urgent)
    for client in [*batch_clients, user_client]:
        await client.close()
    # Batch work may hold at most half of prefill's slots (inference/budget.py: 4 of 8), so in
    # 0.2 s prefill took at most those plus what one pass freed; everything still queued when the
    # urgent request arrived must come after it. First come, first served would put it last.
    assert len(order) - 1 - order.index("urgent") >= 4, order


async def test_client_disconnect_stops_generation_in_the_decode_worker(vllm_stack):
    nc = await nats.connect(vllm_stack.settings.bus.nats_url,
                            **BusAuth.of(vllm_stack.settings.bus, "ops").connect_options())
    beats: list[Heartbeat] = []

    async def on_beat(msg) -> None:
        beats.append(decode(msg.data, Heartbeat))

    await nc.subscribe(vllm_stack.subjects.heartbeat("local", "decode"), cb=on_beat)
    events = await nc.subscribe(f"{vllm_stack.settings.bus.subject_prefix}.evt.>")
    await asyncio.sleep(1.5)
    cancelled_before = beats[-1].cancelled
    client = await EdgeClient.connect(vllm_stack.url)
    request_id, tokens = "", 0
    # Sampled, not greedy: a greedy story loops, speculation then accepts most drafts, and 1,000
    # tokens are done within the resume grace period (10 s) that comes before the cancel.
    async for frame in client.stream([{"role": "user", "content": "Tell me a very long story about a dragon."}],
                                     max_tokens=1000, temperature=1.0, seed=7):
        request_id = frame.get("request_id", request_id)
        tokens += frame["type"] == "token"
        if tokens == 3:
            break
    await client.close()
    for _ in range(100):
        await asyncio.sleep(0.2)
        if beats[-1].cancelled > cancelled_before and beats[-1].active == 0:
            break
    assert beats[-1].cancelled == cancelled_before + 1 and beats[-1].active == 0
    published = 0
    while True:
        try:
            msg = await events.next_msg(timeout=0.5)
        except asyncio.TimeoutError:
            break
        published += msg.subject.endswith(request_id)
    assert 3 <= published < 500  # far fewer than the 1,000 tokens it asked for
    await nc.close()


async def test_answers_report_their_cost_and_workers_advertise_budgets_from_the_engine(vllm_stack):
    nc = await nats.connect(vllm_stack.settings.bus.nats_url,
                            **BusAuth.of(vllm_stack.settings.bus, "ops").connect_options())
    beats: dict[str, Heartbeat] = {}

    async def on_beat(msg) -> None:
        beat = decode(msg.data, Heartbeat)
        beats[beat.role] = beat

    await nc.subscribe(vllm_stack.subjects.heartbeats("local"), cb=on_beat)
    result = await chat(vllm_stack, [unique_system("Be brief."), {"role": "user", "content": "Name a colour."}])
    assert result.error is None, result.error
    cost = result.done["cost"]
    assert cost["prefill_gpu_s"] > 0 and cost["decode_gpu_s"] > 0
    price = vllm_stack.settings.worker.gpu_price_per_hour / 3600
    assert cost["usd"] == pytest.approx((cost["prefill_gpu_s"] + cost["decode_gpu_s"]) * price, rel=1e-3)
    # a request alone on its workers is charged their whole time on it, no more
    assert cost["decode_gpu_s"] <= result.done["timings"]["decode_ms"] / 1000 + 0.5
    for _ in range(50):
        await asyncio.sleep(0.2)
        if beats.get("decode") and beats["decode"].rate_tokens_s > 0 and beats.get("prefill"):
            break
    decode_beat, prefill_beat = beats["decode"], beats["prefill"]
    await nc.close()
    # decode's budget is vLLM's KV cache in tokens: whole 32-token blocks, more than one context
    assert decode_beat.budget_tokens % 32 == 0 and decode_beat.budget_tokens > vllm_stack.settings.served.max_model_len
    assert prefill_beat.budget_tokens == vllm_stack.settings.worker.prefill_token_budget
    assert decode_beat.rate_tokens_s > 0  # measured from the jobs served


async def test_bad_frames_get_errors_and_the_connection_survives(vllm_stack):
    async with await EdgeClient.connect(vllm_stack.url) as client:
        for raw, code in (("{oops", "invalid_json"), ('{"type": "dance"}', "invalid_frame"),
                          (json.dumps({"type": "chat", "messages": SHORT, "max_tokens": -1}), "invalid_request"),
                          (json.dumps({"type": "chat", "messages": SHORT, "temperature": 99}), "invalid_request")):
            await client.send_raw(raw)
            frame = await asyncio.wait_for(client.unrouted.get(), 10)
            assert (frame["type"], frame["code"]) == ("error", code)
        result = await client.complete(SHORT, max_tokens=8, temperature=0.0)
    assert result.error is None and result.text


async def test_draft_model_speculation_decodes_the_same_text_from_the_same_kv(vllm_stack, tmp_path):
    """A second decode worker, in its own region, speculating with a draft model (the bundled
    model drafts for itself: no smaller one ships here) continues a captured job."""
    settings = vllm_stack.settings.replace(region="draft", spec_method="draft",
                                           spec_draft_model=vllm_stack.settings.served.model,
                                           worker_id="draft-decode")
    spawn_worker(vllm_stack, settings, "decode")
    log = vllm_stack.logs / f"{settings.bus.worker_id}.log"
    try:
        job, text = await decode_job_of(vllm_stack, [unique_system("Reply briefly."),
                                                     {"role": "user", "content": "Describe a horse."}])
        nc = await nats.connect(settings.bus.nats_url, **BusAuth.of(settings.bus, "ops").connect_options())
        beats = await nc.subscribe(vllm_stack.subjects.heartbeat("draft", "decode"))
        await beats.next_msg(timeout=300)  # the draft worker is up
        await nc.close()
        replayed, final = await replay_decode(vllm_stack, job, region="draft")
        assert text.endswith(replayed) and len(replayed) < len(text)
        assert 0 <= final["kv"]["loaded_tokens"] - job.kv.num_tokens < 32 and not final["kv"]["recomputed"]
        assert '"speculative": "draft"' in log.read_text()
    finally:
        vllm_stack.supervisor.stop(settings.bus.worker_id)
