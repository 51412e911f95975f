"""KV blocks belong to a tenant, through the whole pipeline: the tenant an API key names reaches
the engine as the request's KV namespace, on the prefill and on the decode path (real edge,
NATS, workers and Redis; fake engines that keep the KV contract).

What the namespace then decides is proven against the real KV code, not the fake engine's
stand-in: `kv_store.keys.loadable_keys` with Redis in tests/unit/test_kv_keys.py, and the
real connector inside the real vLLM engine in tests/integration/test_kv_integrity.py (another
tenant's prefill loads 0 tokens; a decode request whose handle names another tenant's
blocks loads nothing and recomputes)."""

from __future__ import annotations

import time

import msgspec

from bus.codec import encode
from bus.messages import ChatMessage, DecodeJob, KvHandle, PrefillStats, SamplingSpec
from edge.client import EdgeClient
from edge.tenants import add_key
from services.lab.fake_engine import BLOCK, LAYOUT, FakeEngine, reply_for
from kv_store.block_store import BlockStore
from kv_store.keys import prompt_block_keys
from tests.pipeline.harness import bus_client, running_stack
from tests.pipeline.test_bus_faults import engine_with_store
from tests.pipeline.test_chat_flow import engines

EVERY_PRIORITY = ["interactive", "standard", "batch"]


async def test_one_tenants_kv_is_never_served_to_another(settings, tmp_path):
    keys_file = tmp_path / "keys.json"
    gold = add_key(keys_file, "gold", EVERY_PRIORITY, 8)
    bulk = add_key(keys_file, "bulk", EVERY_PRIORITY, 8)
    settings = settings.replace(api_keys_file=str(keys_file))
    turn1 = [{"role": "system", "content": "be brief " * 10}, {"role": "user", "content": "first"}]

    async def ask(key: str, messages):
        async with await EdgeClient.connect(
                stack.url, additional_headers={"Authorization": f"Bearer {key}"}) as client:
            return await client.complete(messages)
    async with running_stack(settings, *engines(settings)) as stack:
        r1 = await ask(gold, turn1)
        turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "second"}]
        same_tenant = await ask(gold, turn2)
        other_tenant = await ask(bulk, turn2)
    assert same_tenant.done["usage"]["cached_prompt_tokens"] > 0
    assert other_tenant.done["usage"]["cached_prompt_tokens"] == 0  # same tokens, other tenant
    assert other_tenant.text == same_tenant.text


async def test_a_decode_job_naming_another_tenants_blocks_recomputes(settings):
    """Even a decode job that reaches the pool with a handle to gold's blocks but tenant bulk
    (a bug, or a forged job) does not load them: the handle is checked against bulk's keys."""
    store = BlockStore(settings.kv.redis_url, 60)
    prompt = FakeEngine("decode").render_chat([ChatMessage("user", "whose cache is this, anyway?")])
    gold_keys = prompt_block_keys(settings.kv.kv_key_prefix, LAYOUT, prompt, BLOCK, len(prompt) // BLOCK, "gold")
    store.save([(k, b"kv") for k in gold_keys])
    handle = KvHandle(model_id="fake", layout=LAYOUT, block_size=BLOCK, keys=gold_keys,
                      num_tokens=len(gold_keys) * BLOCK, content_hash=gold_keys[-1])
    reply = reply_for(bytes(prompt))
    stats = PrefillStats(worker_id="probe", queue_ms=1, prefill_ms=2, cached_tokens=0, done_at=time.time())

    async def decoded(tenant: str) -> dict:
        subjects = stack.subjects
        rid = f"kv{tenant}"
        job = DecodeJob(request_id=rid, region="local", priority="interactive",
                        reply_to=subjects.events("local", "probe", rid), prompt_token_ids=prompt,
                        first_token_id=reply[0], sampling=SamplingSpec(max_tokens=200), prefill=stats,
                        kv=handle, tenant=tenant)
        events = await nc.subscribe(job.reply_to)
        await nc.jetstream().publish(subjects.decode("local", "interactive"), encode(job))
        text = ""
        while True:
            event = msgspec.json.decode((await events.next_msg(timeout=5)).data)
            if event["type"] != "token":
                return {"text": text, **event}
            text += event["text"]
    async with running_stack(settings, FakeEngine("prefill"), engine_with_store(settings)) as stack, \
            bus_client(settings) as nc:
        owner, intruder = await decoded("gold"), await decoded("bulk")
    assert owner["kv"]["loaded_tokens"] == len(gold_keys) * BLOCK and not owner["kv"]["recomputed"]
    assert intruder["kv"]["loaded_tokens"] == 0 and intruder["kv"]["recomputed"]
    assert intruder["text"] == owner["text"] == reply[1:].decode()
