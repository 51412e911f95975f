"""The OpenAI-compatible API and resumable streams against the real stack (vLLM processes):
the official SDK streaming and not, and streams dropped mid-answer and resumed, all giving
exactly the plain engine's greedy answer."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
import websockets

from tests.integration.conftest import API, MAX_TOKENS
from tests.sse import sse

pytestmark = pytest.mark.engine


def sdk(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.api_url, api_key="unused", max_retries=0, timeout=120)


async def test_the_openai_sdk_streaming_and_not_gives_the_engines_answer(vllm_stack, reference):
    client = sdk(vllm_stack)
    model = (await client.models.list()).data[0].id
    reply = await client.chat.completions.create(model=model, messages=API, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == reference["api"].text
    assert reply.usage.prompt_tokens == len(reference["api"].prompt_token_ids)

    stream = await client.chat.completions.create(model=model, messages=API, max_tokens=MAX_TOKENS, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference["api"].text
    last = chunks[-1]
    assert last.usage.completion_tokens == reply.usage.completion_tokens
    # the second run found the first one's prompt blocks in the KV cache
    assert last.usage.prompt_tokens_details.cached_tokens > 0
    timings = last.model_extra["grokstack"]["timings"]
    assert timings["prefill_ms"] > 0 and timings["decode_ms"] > 0


async def sse_events(response: aiohttp.ClientResponse, limit: int | None = None) -> list[tuple[int, dict | None]]:
    """(seq, chunk) per SSE event carrying content or the end, until [DONE] or `limit` contents."""
    out: list[tuple[int, dict | None]] = []
    async for seq, data in sse(response):
        if data == "[DONE]":
            out.append((-1, None))
            return out
        chunk = json.loads(data)
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            out.append((-1 if seq is None else seq, chunk))
            if limit is not None and len(out) >= limit:
                return out
    return out


def text_of(events: list[tuple[int, dict | None]]) -> str:
    return "".join(chunk["choices"][0]["delta"]["content"] for _, chunk in events if chunk)


async def test_an_sse_stream_dropped_mid_answer_resumes_to_the_same_text(vllm_stack, reference):
    body = {"model": vllm_stack.settings.served.model_id, "messages": API, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{vllm_stack.api_url}/chat/completions", json=body,
                             headers={"Accept": "text/event-stream"}) as r:
            request_id = r.headers["X-Request-Id"]
            token = r.headers["X-Grokstack-Resume-Token"]  # only the asker is told it
            before = await sse_events(r, limit=4)
        await asyncio.sleep(1.0)  # away for a second while decoding goes on
        async with http.get(f"{vllm_stack.api_url}/chat/completions/{request_id}/stream",
                            headers={"Last-Event-ID": str(before[-1][0]), "X-Grokstack-Resume-Token": token}) as r:
            after = await sse_events(r)
    contents = [seq for seq, chunk in before + after if chunk]
    assert contents == list(range(len(contents))), "a token was repeated or lost"
    assert after[-1][1] is None  # ended with [DONE]
    assert text_of(before) + text_of(after) == reference["api"].text


async def test_a_websocket_stream_dropped_mid_answer_resumes_to_the_same_text(vllm_stack, reference):
    async with websockets.connect(vllm_stack.url) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "q", "messages": API, "max_tokens": MAX_TOKENS,
                                  "temperature": 0}))
        tokens: list[dict] = []
        while len(tokens) < 4:
            frame = json.loads(await ws.recv())
            if frame["type"] == "accepted":
                request_id, token = frame["request_id"], frame["resume_token"]
            elif frame["type"] == "token":
                tokens.append(frame)
    await asyncio.sleep(1.0)
    async with websockets.connect(vllm_stack.url) as ws:
        await ws.send(json.dumps({"type": "resume", "id": "q", "request_id": request_id,
                                  "last_seq": tokens[-1]["seq"], "resume_token": token}))
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "token":
                tokens.append(frame)
            elif frame["type"] in ("done", "error"):
                break
    assert frame["type"] == "done", frame
    assert [t["seq"] for t in tokens] == list(range(len(tokens))), "a token was repeated or lost"
    assert "".join(t["text"] for t in tokens) == reference["api"].text
