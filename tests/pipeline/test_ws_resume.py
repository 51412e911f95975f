"""Websocket streams resume after a dropped connection, with the request's resume token only;
API keys and the Origin check on the websocket handshake."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from edge.client import EdgeClient
from edge.protocol import MAX_SEQ
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
                request_id, token = frame["request_id"], frame["resume_token"]
            else:
                seen.append(frame)
        await ws.close()  # the network drops
        await asyncio.sleep(0.3)
        async with websockets.connect(stack.url) as ws2:
            # the request id alone, or with another request's token, resumes nothing
            await ws2.send(json.dumps({"type": "resume", "id": "n", "request_id": request_id,
                                       "resume_token": stack.edge.server.guard.token("public", "f" * 32)}))
            stolen = await frames_until_end(ws2, "n")
            await ws2.send(json.dumps({"type": "resume", "id": "m", "request_id": request_id}))
            missing = await frames_until_end(ws2, "m")
            await ws2.send(json.dumps({"type": "resume", "id": "b", "request_id": request_id,
                                       "resume_token": token, "last_seq": seen[-1]["seq"]}))
            rest = await frames_until_end(ws2, "b")
            # resuming a request that is not (or no longer) here is a clear error
            await ws2.send(json.dumps({"type": "resume", "id": "c", "request_id": "f" * 32, "last_seq": 3,
                                       "resume_token": stack.edge.server.guard.token("public", "f" * 32)}))
            unknown = await frames_until_end(ws2, "c")
        assert [f["code"] for f in stolen] == ["unknown_request"]
        assert stolen[0]["message"] == unknown[0]["message"].replace("f" * 32, request_id)  # nothing learnt
        assert [f["code"] for f in missing] == ["invalid_frame"] and "resume_token" in missing[0]["message"]
        assert rest[0] == {"type": "accepted", "id": "b", "request_id": request_id, "resumed": True,
                           "resume_token": token, "region": "local", "route": "home"}
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
        resume = {"type": "resume", "id": "x", "request_id": result.request_id, "resume_token": result.resume_token}
        async with websockets.connect(f"{stack.url}/ws?api_key={other}") as ws:  # even with gold's token
            await ws.send(json.dumps(resume))
            assert (await frames_until_end(ws, "x"))[-1]["code"] == "unknown_request"
        async with websockets.connect(f"{stack.url}/ws?api_key={gold}") as ws:
            await ws.send(json.dumps(resume))
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


async def test_resume_past_the_end_or_at_the_bounds_of_last_seq_ends_with_the_final_frame(settings):
    """Any last_seq in [-1, MAX_SEQ] gives the events after it, in order, then the end (also when it
    is past the end: the stream still ends); beyond the bounds is an error frame naming the field."""
    async with running_stack(settings, *engines(settings)) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            result = await client.complete([{"role": "user", "content": "replay me"}])
        async with websockets.connect(stack.url) as ws:
            replays = {}
            for n, last_seq in enumerate((-1, 0, 2, MAX_SEQ)):
                await ws.send(json.dumps({"type": "resume", "id": f"r{n}", "request_id": result.request_id,
                                          "resume_token": result.resume_token, "last_seq": last_seq}))
                replays[last_seq] = await asyncio.wait_for(frames_until_end(ws, f"r{n}"), 30)  # it ends
            bad = {}
            for n, last_seq in enumerate((-2, -(2**63), MAX_SEQ + 1, 10**30, 1.5, "3")):
                await ws.send(json.dumps({"type": "resume", "id": f"b{n}", "request_id": result.request_id,
                                          "resume_token": result.resume_token, "last_seq": last_seq}))
                bad[str(last_seq)] = await frames_until_end(ws, f"b{n}")
            # the connection lives on after all of it
            await ws.send(json.dumps({"type": "chat", "id": "after", "messages": [{"role": "user", "content": "hi"}]}))
            after = await frames_until_end(ws, "after")
    texts = {k: "".join(f["text"] for f in v if f["type"] == "token") for k, v in replays.items()}
    seqs = {k: [f["seq"] for f in v if f["type"] == "token"] for k, v in replays.items()}
    assert texts[-1] == expected("replay me") and seqs[-1] == list(range(len(seqs[-1])))
    assert seqs[0] == seqs[-1][1:] and seqs[2] == seqs[-1][3:]
    assert texts[MAX_SEQ] == "" and replays[MAX_SEQ][-1]["type"] == "done"
    for value, frames in bad.items():
        assert [f["type"] for f in frames] == ["error"], value
        assert frames[0]["code"] == "invalid_frame" and "last_seq" in frames[0]["message"], (value, frames)
    assert after[-1]["type"] == "done"


async def test_resumes_are_rate_limited_per_connection_and_per_tenant(settings):
    settings = settings.replace(resume_client_rate=1.0, resume_client_burst=3, resume_tenant_rate=0.01,
                                resume_tenant_burst=5)
    async with running_stack(settings, *engines(settings)) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            result = await client.complete([{"role": "user", "content": "mine"}])
        resume = {"type": "resume", "request_id": result.request_id, "resume_token": result.resume_token}
        codes = []
        async with websockets.connect(stack.url) as ws:  # 3 at once per connection, wrong token or not
            for n in range(4):
                token = result.resume_token if n % 2 else "A" * 22
                await ws.send(json.dumps({**resume, "id": f"a{n}", "resume_token": token}))
                codes.append((await frames_until_end(ws, f"a{n}"))[-1])
        assert [f["code"] if f["type"] == "error" else f["type"] for f in codes] == \
            ["unknown_request", "done", "unknown_request", "rate_limited"]
        assert 0 < codes[-1]["retry_after_s"] <= 1.0 and codes[-1]["retryable"] is True
        # the tenant's 5: 1 spent above (the one valid token let through), 4 more on new connections
        tenant_codes = []
        for _ in range(5):
            async with websockets.connect(stack.url) as ws:
                await ws.send(json.dumps({**resume, "id": "t"}))
                frame = (await frames_until_end(ws, "t"))[-1]
                tenant_codes.append(frame["code"] if frame["type"] == "error" else frame["type"])
        assert tenant_codes == ["done"] * 4 + ["rate_limited"], tenant_codes
        async with websockets.connect(stack.url) as ws:  # chats are not resumes: unaffected
            await ws.send(json.dumps({"type": "chat", "id": "c", "messages": [{"role": "user", "content": "hi"}]}))
            assert (await frames_until_end(ws, "c"))[-1]["type"] == "done"


async def test_the_websocket_takes_browsers_only_from_allowed_origins(settings):
    async with running_stack(settings.replace(allowed_origins="https://chat.example.com, https://b.example"),
                             *engines(settings)) as stack:
        host = stack.url.removeprefix("ws://")
        for origin in (None, f"http://{host}", f"https://{host}", "https://chat.example.com", "https://b.example/"):
            headers = {"Origin": origin} if origin else {}
            async with await EdgeClient.connect(stack.url, origin=None, additional_headers=headers) as client:
                assert (await client.complete([{"role": "user", "content": "hi"}])).done is not None, origin
        for origin in ("https://evil.example", "null", f"http://{host}.evil.example", "file://", "https://chat.example.co"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(stack.url, additional_headers={"Origin": origin})
            assert refused.value.response.status_code == 403, origin
            body = refused.value.response.body.decode()
            assert repr(origin) in body and "allowed_origins" in body
    async with running_stack(settings, *engines(settings)) as stack:  # the default: the page's own only
        host = stack.url.removeprefix("ws://")
        async with await EdgeClient.connect(stack.url, additional_headers={"Origin": f"http://{host}"}):
            pass
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(stack.url, additional_headers={"Origin": "https://chat.example.com"})
        assert refused.value.response.status_code == 403
