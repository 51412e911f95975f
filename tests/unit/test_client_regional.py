"""RegionalClient (edge/client.py) against scripted edges: in-process websocket servers that answer
as the edge would, and die on cue. A request goes on over the next edge that answers, resumes after
the last token seen, is sent again (and its shown tokens kept) when no edge knows it, and gives up
in time when no edge comes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, Awaitable, Callable

import pytest
import websockets

from edge.client import EdgeUnreachable, RegionalClient, chat_repl, collect
from services.embedded import free_port

QUESTION = [{"role": "user", "content": "What colour is the sky?"}]
PARAMS = {"max_tokens": 32, "temperature": 0.8, "priority": "standard", "seed": 7}
ANSWER = ["The ", "sky ", "is ", "blue", "."]


def dead_url() -> str:
    return f"ws://127.0.0.1:{free_port()}"  # nobody listens there


class ScriptedEdge:
    """A websocket server playing an edge: `script(edge, ws, frame)` answers each frame it receives."""

    def __init__(self, script: Callable[["ScriptedEdge", Any, dict], Awaitable[None]]) -> None:
        self.script = script
        self.received: list[dict] = []
        self.connections = 0

    async def __aenter__(self) -> "ScriptedEdge":
        self.server = await websockets.serve(self._handle, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, ws) -> None:
        self.connections += 1
        with contextlib.suppress(websockets.ConnectionClosed):  # as when it dies
            async for raw in ws:
                frame = json.loads(raw)
                self.received.append(frame)
                await self.script(self, ws, frame)

    def die(self) -> None:
        """As a crash looks from outside: the sockets drop without a goodbye, and nobody listens."""
        for ws in list(self.server.connections):
            ws.transport.abort()
        self.server.close()


async def accept(ws, frame: dict, request_id: str, resumed: bool = False, region: str = "eu",
                 route: str = "home") -> None:
    await ws.send(json.dumps({"type": "accepted", "id": frame["id"], "request_id": request_id, "resumed": resumed,
                              "resume_token": f"token-of-{request_id}", "region": region, "route": route}))


async def tokens(ws, frame: dict, texts: list[str], first_seq: int = 0) -> None:
    for seq, text in enumerate(texts[first_seq:], first_seq):
        await ws.send(json.dumps({"type": "token", "id": frame["id"], "seq": seq, "text": text, "tokens": 1}))


async def done(ws, frame: dict, completion_tokens: int, region: str = "eu", route: str = "home") -> None:
    usage = {"prompt_tokens": 9, "cached_prompt_tokens": 0, "completion_tokens": completion_tokens, "ttft_ms": 5.0,
             "total_ms": 50.0, "region": region, "route": route}
    await ws.send(json.dumps({"type": "done", "id": frame["id"], "finish_reason": "stop", "usage": usage,
                              "timings": {}, "kv": {}, "cost": {"prefill_gpu_s": 0, "decode_gpu_s": 0, "usd": 0}}))


async def answers_whole(edge: ScriptedEdge, ws, frame: dict) -> None:
    await accept(ws, frame, "r-whole")
    await tokens(ws, frame, ANSWER)
    await done(ws, frame, len(ANSWER))


async def dies_after_three_tokens(edge: ScriptedEdge, ws, frame: dict) -> None:
    await accept(ws, frame, "r1")
    await tokens(ws, frame, ANSWER[:3])
    edge.die()


async def resumes(edge: ScriptedEdge, ws, frame: dict) -> None:
    """An edge of another region that finds the request (mirrored) and continues it."""
    assert frame["type"] == "resume", frame
    await accept(ws, frame, frame["request_id"], resumed=True, route="failover")
    await tokens(ws, frame, ANSWER, first_seq=frame["last_seq"] + 1)
    await done(ws, frame, len(ANSWER), region="us", route="failover")


async def test_it_connects_to_the_first_edge_that_answers():
    async with ScriptedEdge(answers_whole) as edge:
        async with RegionalClient([dead_url(), edge.url, dead_url()]) as edges:
            assert edges.url == edge.url
            result = await edges.complete(QUESTION, **PARAMS)
    assert result.text == "".join(ANSWER) and result.done and result.error is None
    assert (result.request_id, result.region, result.route, result.resubmitted) == ("r-whole", "eu", "home", False)
    assert edge.received == [{"type": "chat", "id": "c1", "messages": QUESTION, **PARAMS}]


async def test_a_dropped_request_resumes_on_the_next_edge_after_the_last_token_seen():
    async with ScriptedEdge(dies_after_three_tokens) as a, ScriptedEdge(resumes) as b:
        async with RegionalClient([a.url, dead_url(), b.url]) as edges:
            frames = [f async for f in edges.stream(QUESTION, **PARAMS)]
    assert [f["type"] for f in frames] == ["accepted", "token", "token", "token", "reconnected", "accepted",
                                           "token", "token", "done"]
    assert frames[4] == {"type": "reconnected", "url": b.url}
    assert b.received == [{"type": "resume", "id": "c1", "request_id": "r1", "resume_token": "token-of-r1",
                           "last_seq": 2}]
    result = await collect(_replay(frames))
    assert result.text == "".join(ANSWER) and result.error is None and not result.resubmitted
    assert (result.region, result.route) == ("us", "failover")  # the done frame's word is the last


async def test_a_request_no_edge_knows_is_sent_again_and_keeps_the_tokens_already_shown():
    second = ["A ", "grey ", "one ", "today", "!"]  # sampled: the new answer starts differently

    async def knows_nothing(edge: ScriptedEdge, ws, frame: dict) -> None:
        if frame["type"] == "resume":
            await ws.send(json.dumps({"type": "error", "id": frame["id"], "code": "unknown_request",
                                      "message": "no such request", "retryable": False}))
        else:
            await accept(ws, frame, "r2", route="failover")
            await tokens(ws, frame, second)
            await done(ws, frame, len(second), route="failover")

    async with ScriptedEdge(dies_after_three_tokens) as a, ScriptedEdge(knows_nothing) as b:
        async with RegionalClient([a.url, b.url]) as edges:
            result = await edges.complete(QUESTION, **PARAMS)
    assert result.text == "The sky is today!"  # what was shown, then the new answer after seq 2
    assert result.resubmitted and result.done and result.error is None
    assert (result.request_id, result.route) == ("r2", "failover")
    resume, chat = b.received
    assert resume == {"type": "resume", "id": "c1", "request_id": "r1", "resume_token": "token-of-r1", "last_seq": 2}
    assert {**chat, "id": None} == {**a.received[0], "id": None}  # the same messages and parameters


async def test_a_chat_lost_before_it_was_accepted_is_sent_again():
    async def dies_at_once(edge: ScriptedEdge, ws, frame: dict) -> None:
        edge.die()

    async with ScriptedEdge(dies_at_once) as a, ScriptedEdge(answers_whole) as b:
        async with RegionalClient([a.url, b.url]) as edges:
            result = await edges.complete(QUESTION, **PARAMS)
    assert result.text == "".join(ANSWER) and not result.resubmitted
    assert [f["type"] for f in b.received] == ["chat"] and b.received[0]["messages"] == QUESTION


async def test_requests_in_flight_move_to_one_new_connection_together():
    chats = 0

    async def two_then_die(edge: ScriptedEdge, ws, frame: dict) -> None:
        nonlocal chats
        chats += 1
        await accept(ws, frame, f"r{chats}")
        await tokens(ws, frame, ANSWER[:1])
        if chats == 2:
            await asyncio.sleep(0.05)
            edge.die()

    async with ScriptedEdge(two_then_die) as a, ScriptedEdge(resumes) as b:
        async with RegionalClient([a.url, b.url]) as edges:
            results = await asyncio.gather(edges.complete(QUESTION), edges.complete(QUESTION))
    assert [r.text for r in results] == ["".join(ANSWER)] * 2
    assert b.connections == 1
    assert sorted((f["request_id"], f["last_seq"]) for f in b.received) == [("r1", 0), ("r2", 0)]


async def test_it_gives_up_when_no_edge_comes_back():
    async with ScriptedEdge(dies_after_three_tokens) as a:
        async with RegionalClient([a.url, dead_url()], give_up_s=0.6) as edges:
            started = time.monotonic()
            result = await asyncio.wait_for(edges.complete(QUESTION), 10)
    assert time.monotonic() - started < 5
    assert result.text == "".join(ANSWER[:3]) and result.done is None
    assert result.error["code"] == "connection_closed" and "no edge answered" in result.error["message"]


async def test_no_edge_at_all_is_a_clear_error():
    with pytest.raises(EdgeUnreachable, match="no edge answered"):
        await asyncio.wait_for(RegionalClient([dead_url(), dead_url()], give_up_s=0.3).connect(), 10)
    assert issubclass(EdgeUnreachable, OSError)
    with pytest.raises(ValueError):
        RegionalClient([])


async def test_the_terminal_chat_takes_several_edges_and_goes_on_over_another(monkeypatch, capsys):
    lines = iter(["What colour is the sky?"])

    def typed(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)
    async with ScriptedEdge(dies_after_three_tokens) as a, ScriptedEdge(resumes) as b:
        await asyncio.wait_for(chat_repl([dead_url(), a.url, b.url], "interactive", 32, 0.0, None), 30)
    out = capsys.readouterr().out
    assert f"connected to {a.url}" in out
    assert "The sky is  [reconnected, resuming] blue." in out
    assert "region us (failover)" in out
    assert b.received[0]["type"] == "resume"


async def _replay(frames: list[dict]):
    for frame in frames:
        yield frame


async def test_a_resume_told_to_wait_waits_as_told_and_resumes_then():
    """An edge that limits resumes (many clients came back at once) says rate_limited with
    retry_after_s: the client waits that long (with jitter), then resumes, not the chat again."""
    async def limits_once(edge: ScriptedEdge, ws, frame: dict) -> None:
        if len(edge.received) == 1:
            await ws.send(json.dumps({"type": "error", "id": frame["id"], "code": "rate_limited", "retryable": True,
                                      "message": "too many resumes", "retry_after_s": 0.2}))
        else:
            await resumes(edge, ws, frame)

    async with ScriptedEdge(dies_after_three_tokens) as a, ScriptedEdge(limits_once) as b:
        async with RegionalClient([a.url, b.url]) as edges:
            result = await edges.complete(QUESTION, **PARAMS)
    assert result.text == "".join(ANSWER) and result.error is None and not result.resubmitted
    assert [f["type"] for f in b.received] == ["resume", "resume"]
    assert {**b.received[0], "id": None} == {**b.received[1], "id": None}  # the same resume, after the wait
