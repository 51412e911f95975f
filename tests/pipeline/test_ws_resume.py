"""Websocket streams resume after a dropped connection; API keys on the websocket."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from edge.client import EdgeClient
from edge.tenants import add_key
from services.lab.fake_engine import FakeEngine
from tests.pipeline.harness import running_stack
from tests.pipeline.test_chat_flow import engines, expected


async def frames_until_end(ws, client_id: str) -> list[dict]:
    out = []
    while True:
        frame = json.loads(await ws.recv())
        if frame.get("id") == client_id:
            out.append(frame)
            if frame["type"] in ("done", "error"):
                return out


async def test_a_websocket_stream_resumes_on_a_new_connection_with_no_gap_or_repeat(settings):
    question = "drop me halfway " * 3
    async with running_stack(settings, FakeEngine("prefill"), FakeEngine("decode", token_delay_s=0.02)) as stack:
        ws = await websockets.connect(stack.url)
        await ws.send(json.dumps({"type": "chat", "id": "a", "messages": [{"role": "user", "content": question}]}))
        seen: list[dict] = []
        while len(seen) < 6:
            frame = json.loads(await ws.recv())
            if frame["type"] == "accepted":
                request_id = frame["request_id"]
            else:
                seen.append(frame)
        await ws.close()  # the network drops
        await asyncio.sleep(0.3)
        async with websockets.connect(stack.url) as ws2:
            await ws2.send(json.dumps({"type": "resume", "id": "b", "request_id": request_id,
                                       "last_seq": seen[-1]["seq"]}))
            rest = await frames_until_end(ws2, "b")
            # resuming a request that is not (or no longer) here is a clear error
            await ws2.send(json.dumps({"type": "resume", "id": "c", "request_id": "f" * 32, "last_seq": 3}))
            unknown = await frames_until_end(ws2, "c")
        assert rest[0] == {"type": "accepted", "id": "b", "request_id": request_id, "resumed": True,
                           "region": "local", "route": "home"}
        tokens = seen + [f for f in rest if f["type"] == "token"]
        assert [f["seq"] for f in tokens] == list(range(len(tokens)))
        assert "".join(f["text"] for f in tokens) == expected(question)
        assert rest[-1]["type"] == "done"
        assert unknown[-1]["code"] == "unknown_request"
        assert stack.decode.worker.counters.cancelled == 0


async def test_websocket_api_keys_header_or_query_and_tenants_cannot_resume_each_other(settings, tmp_path):
    keys_file = tmp_path / "keys.json"
    gold = add_key(keys_file, "gold", [], 0)
    other = add_key(keys_file, "other", [], 0)
    settings = settings.replace(api_keys_file=str(keys_file))
    async with running_stack(settings, *engines(settings)) as stack:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(stack.url)
        assert refused.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(f"{stack.url}/ws?api_key=nope")
        async with await EdgeClient.connect(stack.url, additional_headers={"Authorization": f"Bearer {gold}"}) as c:
            result = await c.complete([{"role": "user", "content": "mine"}])
        assert result.text == expected("mine")
        async with websockets.connect(f"{stack.url}/ws?api_key={other}") as ws:
            await ws.send(json.dumps({"type": "resume", "id": "x", "request_id": result.request_id}))
            assert (await frames_until_end(ws, "x"))[-1]["code"] == "unknown_request"
        async with websockets.connect(f"{stack.url}/ws?api_key={gold}") as ws:
            await ws.send(json.dumps({"type": "resume", "id": "x", "request_id": result.request_id}))
            replay = await frames_until_end(ws, "x")
        assert "".join(f["text"] for f in replay if f["type"] == "token") == expected("mine")


async def test_the_terminal_chat_resumes_an_answer_on_a_new_connection(settings, capsys):
    from edge.client import _answer
    question = "keep going after a drop " * 2
    async with running_stack(settings, FakeEngine("prefill"), FakeEngine("decode", token_delay_s=0.02)) as stack:
        client = await EdgeClient.connect(stack.url)

        async def dropping(frames):
            tokens = 0
            async for frame in frames:
                yield frame
                tokens += frame["type"] == "token"
                if tokens == 3:
                    await client.ws.close()  # the network drops mid-answer

        new_client, answer = await _answer(stack.url, client, dropping(client.stream(
            [{"role": "user", "content": question}])))
        await new_client.close()
    assert new_client is not client
    assert answer == expected(question)
    assert "[reconnected, resuming]" in capsys.readouterr().out
