"""Every number a client controls, at its extremes, through the real stack with the real vLLM
engine: the extreme but valid values (seed 0 and 2**63 - 1, temperature 0 and 2, a tiny top_p,
max_tokens 1 and the limit, a stop list at its bound) complete at both doors; the invalid ones
(a seed past 64 bits or negative, out-of-range or infinite floats, max_tokens 0 or past the limit,
stop lists past their bound) are refused at the door, naming the field; nothing is dead-lettered
(before the door checked seeds, one past 64 bits failed inside vLLM, was retried as an internal
failure and dead-lettered)."""

from __future__ import annotations

import json

import aiohttp
import nats
import pytest
import websockets

from bus.credentials import BusAuth
from edge.client import EdgeClient
from edge.protocol import MAX_SEED

pytestmark = pytest.mark.engine

STOPS = ["\u2603" * 64] + [f"never-said-{n}".ljust(64, "x") for n in range(7)]  # 8 of 64 characters: the bound


# Its own prompt: the stack is shared, and test_vllm_stack.py checks that the KV blocks of its
# prompts are written by its own first request.
PROMPT = [{"role": "user", "content": "Name one colour of the rainbow, for the numeric extremes."}]


def valid_params(limit: int) -> list[dict]:
    return [
        {"seed": 0, "temperature": 1.0, "max_tokens": 4},
        {"seed": MAX_SEED, "temperature": 1.0, "max_tokens": 4},
        {"temperature": 0.0, "max_tokens": 4},
        {"temperature": 2.0, "seed": 7, "max_tokens": 4},
        {"top_p": 1e-9, "temperature": 1.0, "max_tokens": 4},
        {"max_tokens": 1},
        {"max_tokens": limit, "temperature": 0.0},
        {"stop": STOPS, "max_tokens": 4, "temperature": 0.0},
    ]


def invalid_params(limit: int) -> list[tuple[dict, str]]:
    return [
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**200}, "seed"),
        ({"seed": -1}, "seed"),
        ({"temperature": 2.0001}, "temperature"),
        ({"temperature": -0.0001}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.0001}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": limit + 1}, "max_tokens"),
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"stop": STOPS + ["one too many"]}, "stop"),
        ({"stop": ["s" * 65]}, "stop"),
    ]


def as_json(obj: dict) -> str:
    """Infinity as JSON can say it: a number too large for a double."""
    return json.dumps(obj).replace("-Infinity", "-1e999").replace("Infinity", "1e999")


async def dead_letters(stack) -> int:
    nc = await nats.connect(stack.settings.bus.nats_url, **BusAuth.of(stack.settings.bus, "ops").connect_options())
    try:
        dlq = stack.subjects.stream("dlq", stack.settings.bus.region)
        return (await nc.jetstream().stream_info(dlq)).state.messages
    finally:
        await nc.close()


async def test_numeric_extremes_complete_or_are_refused_at_the_door_and_nothing_is_dead_lettered(vllm_stack):
    limit = vllm_stack.settings.edge.max_tokens_limit
    model = vllm_stack.settings.served.model_id
    dead_before = await dead_letters(vllm_stack)

    async with await EdgeClient.connect(vllm_stack.url) as client:
        for params in valid_params(limit):
            result = await client.complete(PROMPT, **params)
            assert result.done is not None, (params, result.error)
            assert 1 <= result.done["usage"]["completion_tokens"] <= params["max_tokens"], params
    async with websockets.connect(vllm_stack.url) as ws:
        for n, (params, field) in enumerate(invalid_params(limit)):
            await ws.send(as_json({"type": "chat", "id": f"bad{n}", "messages": PROMPT, **params}))
            frame = json.loads(await ws.recv())  # the only frame: the refusal, before anything is published
            assert frame["type"] == "error" and frame["id"] == f"bad{n}", (params, frame)
            assert frame["code"] in ("invalid_request", "invalid_frame") and field in frame["message"], (params, frame)
    async with aiohttp.ClientSession() as http:
        for params in valid_params(limit):
            async with http.post(f"{vllm_stack.api_url}/chat/completions",
                                 json={"model": model, "messages": PROMPT, **params}) as r:
                body = await r.json()
                assert r.status == 200, (params, body)
                assert body["choices"][0]["finish_reason"] in ("stop", "length")
        for params, field in invalid_params(limit):
            async with http.post(f"{vllm_stack.api_url}/chat/completions",
                                 data=as_json({"model": model, "messages": PROMPT, **params}),
                                 headers={"Content-Type": "application/json"}) as r:
                error = (await r.json())["error"]
                assert r.status == 400 and error["code"] == "invalid_request", (params, error)
                assert error["param"] == field or field in error["message"], (params, error)
    assert await dead_letters(vllm_stack) == dead_before, "a request was dead-lettered"
