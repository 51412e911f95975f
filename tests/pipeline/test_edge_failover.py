"""An edge node dies mid-answer: its clients resume on another edge by request id and resume token
(the other edge checks the token with the shared secret), from the capture stream and then live,
every token exactly once. Lost events are read from the capture."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import websockets

from bus.codec import BadMessage
from bus.codec import decode_event as real_decode_event
from bus import client as client_module
from bus.capture import event_history
from bus.client import JobClient
from edge.client import EdgeClient
from edge.tenants import add_key
from services.lab.fake_engine import FakeEngine
from services.embedded import EmbeddedNats, free_port
from tests.pipeline.harness import another_edge, bus_client, crash, eventually, ops, running_stack
from tests.pipeline.test_direct_publish import raw_job
from tests.pipeline.test_chat_flow import engines, expected
from tests.pipeline.test_openai_api import content_of, read_sse
from tests.pipeline.test_ws_resume import frames_until_end


def slow_engines(delay: float = 0.03):
    return FakeEngine("prefill"), FakeEngine("decode", token_delay_s=delay)


async def start_and_read(url: str, question: str,
                         tokens: int) -> tuple[tuple[str, str], list[dict], websockets.ClientConnection]:
    """(request id, resume token), the first `tokens` token frames, and the open socket."""
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"type": "chat", "id": "a", "messages": [{"role": "user", "content": question}]}))
    request, seen = ("", ""), []
    while len(seen) < tokens:
        frame = json.loads(await ws.recv())
        if frame["type"] == "accepted":
            request = (frame["request_id"], frame["resume_token"])
        else:
            seen.append(frame)
    return request, seen, ws


async def resume_ws(url: str, request: tuple[str, str], last_seq: int, headers: dict | None = None) -> list[dict]:
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "resume", "id": "b", "request_id": request[0], "resume_token": request[1],
                                  "last_seq": last_seq}))
        return await frames_until_end(ws, "b")


def assert_whole_answer_once(tokens: list[dict], question: str) -> None:
    assert [f["seq"] for f in tokens] == list(range(len(tokens)))
    assert "".join(f["text"] for f in tokens) == expected(question)


async def test_a_websocket_client_resumes_on_another_edge_after_its_edge_dies(settings):
    question = "my edge is about to die " * 2
    async with running_stack(settings, *slow_engines()) as stack, another_edge(settings) as doomed:
        (request_id, token), seen, ws = await start_and_read(doomed.url, question, tokens=5)
        await crash(doomed)
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.close()
        rest = await resume_ws(stack.url, (request_id, token), seen[-1]["seq"])
        assert rest[0] == {"type": "accepted", "id": "b", "request_id": request_id, "resumed": True,
                           "resume_token": token, "region": "local", "route": "home"}
        assert rest[-1]["type"] == "done" and rest[-1]["finish_reason"] == "stop"
        assert_whole_answer_once(seen + [f for f in rest if f["type"] == "token"], question)
        # a request that finished (on the dead edge's subject) is still there to replay in full
        again = await resume_ws(stack.url, (request_id, token), -1)
        assert_whole_answer_once([f for f in again if f["type"] == "token"], question)
        assert stack.decode.worker.counters.cancelled == 0


async def test_an_sse_client_resumes_on_another_edge_with_last_event_id(settings):
    question = "stream me over there " * 2
    async with running_stack(settings, *slow_engines()) as stack, another_edge(settings) as doomed:
        assert await eventually(lambda: all(doomed.gateway.workers_alive().values()))
        body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": question}]}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{doomed.api_url}/chat/completions", json=body,
                                 headers={"Accept": "text/event-stream"}) as r:
                request_id, token = r.headers["X-Request-Id"], r.headers["X-Grokstack-Resume-Token"]
                before = await read_sse(r, stop_after=5)
                await crash(doomed)
            seqs_before, text_before = content_of(before)
            resume_url = f"{stack.edge.api_url}/chat/completions/chatcmpl-{request_id}/stream"
            async with http.get(resume_url, headers={"Last-Event-ID": str(seqs_before[-1]),
                                                     "X-Grokstack-Resume-Token": token}) as r:
                assert r.status == 200
                after = await read_sse(r)
        seqs_after, text_after = content_of(after)
        assert seqs_before + seqs_after == list(range(len(seqs_before) + len(seqs_after)))
        assert text_before + text_after == expected(question)
        assert after[-1][1] == "[DONE]"
        assert stack.decode.worker.counters.cancelled == 0


async def test_an_adopted_request_nobody_follows_is_cancelled_after_the_grace(settings):
    settings = settings.replace(resume_grace_s=0.5)
    decode = FakeEngine("decode", token_delay_s=0.05)
    async with running_stack(settings, FakeEngine("prefill"), decode) as stack, another_edge(settings) as doomed:
        (request_id, token), seen, ws = await start_and_read(doomed.url, "long enough to be left " * 4, tokens=3)
        await crash(doomed)
        async with websockets.connect(stack.url) as ws2:  # resumes, reads one token, goes away
            await ws2.send(json.dumps({"type": "resume", "id": "b", "request_id": request_id, "resume_token": token,
                                       "last_seq": seen[-1]["seq"]}))
            while json.loads(await ws2.recv())["type"] != "token":
                pass
        assert await eventually(lambda: stack.decode.worker.counters.cancelled == 1)
        assert decode.aborted == 1


async def test_only_the_same_tenant_resumes_on_another_edge(settings, tmp_path):
    keys_file = tmp_path / "keys.json"
    gold = add_key(keys_file, "gold", [], 0)
    other = add_key(keys_file, "other", [], 0)
    settings = settings.replace(api_keys_file=str(keys_file))
    async with running_stack(settings, *engines(settings)) as stack, another_edge(settings) as doomed:
        async with await EdgeClient.connect(doomed.url, additional_headers={"Authorization": f"Bearer {gold}"}) as c:
            result = await c.complete([{"role": "user", "content": "gold only"}])
        await crash(doomed)
        request = (result.request_id, result.resume_token)
        refused = await resume_ws(stack.url, request, -1, {"Authorization": f"Bearer {other}"})
        assert refused[-1]["code"] == "unknown_request"
        async with aiohttp.ClientSession() as http:
            url = f"{stack.edge.api_url}/chat/completions/chatcmpl-{result.request_id}/stream"
            token = {"X-Grokstack-Resume-Token": result.resume_token}
            async with http.get(url, headers={"Authorization": f"Bearer {other}", **token}) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_request"
            async with http.get(url, headers={"Authorization": f"Bearer {gold}", **token}) as r:
                assert content_of(await read_sse(r))[1] == expected("gold only")
        replay = await resume_ws(stack.url, request, -1, {"Authorization": f"Bearer {gold}"})
        assert_whole_answer_once([f for f in replay if f["type"] == "token"], "gold only")


async def test_events_lost_on_the_way_are_read_from_the_capture(settings, monkeypatch):
    lost = {4, 5, 6, 9}

    def lossy_decode_event(data: bytes):
        event = real_decode_event(data)
        if event.seq in lost:
            lost.discard(event.seq)
            raise BadMessage("lost on the way (test)")  # the edge drops it, as if never received
        return event

    monkeypatch.setattr(client_module, "decode_event", lossy_decode_event)
    question = "some of my tokens go missing"
    async with running_stack(settings, *slow_engines(0.01)) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            result = await client.complete([{"role": "user", "content": question}])
    assert not lost  # they were sent, and dropped
    assert result.done and result.text == expected(question)


async def test_a_nats_server_restart_mid_answer_loses_no_token(settings, tmp_path):
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    settings = settings.replace(nats_url=server.start(), nats_credentials=str(server.credentials_file))
    question = "the broker restarts while I talk " * 2
    try:
        async with running_stack(settings, *slow_engines(0.03)) as stack:
            async with await EdgeClient.connect(stack.url) as client:
                frames = []
                async for frame in client.stream([{"role": "user", "content": question}]):
                    frames.append(frame)
                    if len(frames) == 6:
                        # The edge comes back after the worker, which sends what it buffered and
                        # finishes the answer meanwhile: all of that reaches only the capture.
                        stack.edge.nc.options["reconnect_time_wait"] = 3.0
                        await asyncio.to_thread(server.stop)
                        await asyncio.sleep(0.5)
                        await asyncio.to_thread(server.start)
    finally:
        server.stop()
    assert frames[-1]["type"] == "done", frames[-1]
    assert_whole_answer_once([f for f in frames if f["type"] == "token"], question)


async def test_work_whose_edge_does_not_know_it_is_cancelled_but_a_services_is_not(settings):
    """An edge that hears events of a request nobody there waits for (its client left, or the edge
    restarted) cancels the work; a back-end JobClient does not (it may attach again after a restart)."""
    async with running_stack(settings, FakeEngine("prefill"), FakeEngine("decode", token_delay_s=0.05)) as stack, \
            bus_client(settings) as nc, \
            await JobClient.connect(settings.bus.nats_url, settings.bus.subject_prefix, client_id="some-service",
                                    auth=ops(settings)):
        js, subjects = nc.jetstream(), stack.subjects
        for client_id, rid in ((stack.edge.gateway.edge_id, "orphan-of-the-edge"),
                               ("some-service", "orphan-of-a-service")):
            job = raw_job(settings.bus.subject_prefix, rid, "nobody waits for me " * 3, priority="interactive",
                          reply_to=subjects.events("local", client_id, rid), sampling={"max_tokens": 60})
            await js.publish(subjects.request("local", "interactive", "public", rid), json.dumps(job).encode())

        async def ended_with(rid: str, what: str) -> bool:  # as the capture recorded what workers sent
            events = (await event_history(js, subjects, "local", rid)).from_seq(0)
            return bool(events) and getattr(events[-1], "code", events[-1].__struct_config__.tag) == what
        assert await eventually(lambda: ended_with("orphan-of-the-edge", "cancelled"), timeout=20)
        assert await eventually(lambda: ended_with("orphan-of-a-service", "final"), timeout=20)
