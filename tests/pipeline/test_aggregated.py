"""The aggregated worker (one engine prefills and decodes) behind the same edge and API."""

from __future__ import annotations

import aiohttp
import openai

from bus.messages import ChatMessage
from edge.client import EdgeClient
from services.lab.fake_engine import BLOCK, LAYOUT, FakeEngine
from kv_store.block_store import BlockStore
from kv_store.keys import kv_namespace, prompt_block_keys
from services.processes import start_edge, start_worker
from tests.pipeline.harness import eventually
from tests.pipeline.test_chat_flow import expected


async def test_an_aggregated_worker_alone_serves_websocket_and_openai_clients(settings):
    engine = FakeEngine("aggregated", store=BlockStore(settings.kv.redis_url, 60), key_prefix=settings.kv.kv_key_prefix)
    worker = await start_worker(settings, "aggregated", engine)
    edge = await start_edge(settings)
    try:
        async def ready() -> bool:  # the edge is ready without workers; its body says what it hears
            async with aiohttp.ClientSession() as http, http.get(f"{edge.api_url}/../readyz") as r:
                return r.status == 200 and "prefill=up decode=up" in await r.text()
        assert await eventually(ready), "an aggregated worker counts as prefill and decode"
        first = [{"role": "user", "content": "a question long enough to fill a block or two of the cache"}]
        async with await EdgeClient.connect(edge.url) as client:
            one = await client.complete(first, max_tokens=200)
            assert one.text == expected(first[0]["content"]), one.error
            assert [t for t, _ in one.token_times] == sorted(t for t, _ in one.token_times)
            assert one.done["usage"]["cached_prompt_tokens"] == 0
            # The first turn's KV really is in Redis: every full block of its prompt, under the
            # tenant's namespace (the fake engine keeps the connector's key contract).
            keys = prompt_block_keys(settings.kv.kv_key_prefix, LAYOUT, engine.render_chat(
                [ChatMessage(role="user", content=first[0]["content"])]), BLOCK,
                one.done["usage"]["prompt_tokens"] // BLOCK, kv_namespace("public"))
            assert len(keys) == 5 and engine.store.present_prefix(keys) == len(keys)
            turn2 = [*first, {"role": "assistant", "content": one.text}, {"role": "user", "content": "and then?"}]
            two = await client.complete(turn2, max_tokens=200)
        assert two.text == expected("and then?")
        assert two.done["usage"]["cached_prompt_tokens"] > 0  # the first turn's blocks, from Redis
        api = openai.AsyncOpenAI(base_url=edge.api_url, api_key="x", max_retries=0)
        reply = await api.chat.completions.create(model="fake", messages=first, max_tokens=200)
        assert reply.choices[0].message.content == expected(first[0]["content"])
        assert worker.worker.counters.served == 3
    finally:
        await edge.stop()
        await worker.stop(1.0)
