"""Mutated frames, bodies and resumes against a running edge (real NATS and Redis, fake engines):
every one gets a well-formed answer (an error naming the problem, or a normal response), never a
500 or a dropped connection, and a normal request still gets its answer afterwards."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import websockets

from edge.client import EdgeClient
from edge.protocol import MAX_SEQ
from tests.pipeline.harness import eventually, running_stack
from tests.pipeline.test_chat_flow import engines, expected
from tests.pipeline.test_openai_api import content_of, read_sse, ready
from tests.pipeline.test_ws_resume import frames_until_end

VALID_FRAME = {"type": "chat", "id": "x", "messages": [{"role": "user", "content": "fuzz me"}], "max_tokens": 8,
               "temperature": 0.5, "stop": ["\n"], "priority": "batch"}
VALID_BODY = {"model": "fake", "messages": [{"role": "user", "content": "fuzz me"}], "max_tokens": 8,
              "stream": False, "temperature": 0.5}
ODD = [None, True, -1, 0, 2**64, -1e308, 1e999, "", "\u0000", "x" * 300, [], {}, [None], {"a": 1}, "interactive"]
TOKENS = [b"null", b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\xff", b"-1e999", b"\x00", b"1" * 40]


def mutate(valid: dict, rng: random.Random) -> bytes:
    if rng.random() < 0.5:  # structural: odd values in, fields out
        obj = json.loads(json.dumps(valid))
        for _ in range(rng.randint(1, 3)):
            key = rng.choice([*obj, "extra", "messages"])
            if rng.random() < 0.2:
                obj.pop(key, None)
            elif key == "messages" and rng.random() < 0.5:
                obj["messages"] = [{"role": rng.choice(["user", "bot", ""]), "content": rng.choice(ODD)}]
            else:
                obj[key] = rng.choice(ODD)
        return json.dumps(obj).encode()
    raw = bytearray(json.dumps(valid).encode())  # bytes: flips, cuts, junk
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(raw))
        op = rng.random()
        if op < 0.3:
            raw[at] = rng.randrange(256)
        elif op < 0.6:
            del raw[at:at + rng.randint(1, 8)]
        else:
            raw[at:at] = rng.choice(TOKENS)
    return bytes(raw)


async def test_mutated_frames_and_bodies_get_clear_errors_and_the_edge_keeps_serving(settings):
    rng = random.Random(20261124)
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        async with websockets.connect(stack.url) as ws:
            received: list[dict] = []

            async def reader() -> None:
                async for raw in ws:
                    received.append(json.loads(raw))

            reading = asyncio.create_task(reader())
            for n in range(300):
                frame = mutate({**VALID_FRAME, "id": f"f{n}"}, rng)
                await ws.send(frame.decode("utf-8", "replace") if rng.random() < 0.5 else frame)
            await ws.send(json.dumps({**VALID_FRAME, "id": "last", "max_tokens": 100, "temperature": 0}))
            for _ in range(200):
                if any(f.get("id") == "last" and f["type"] in ("done", "error") for f in received):
                    break
                await asyncio.sleep(0.05)
            reading.cancel()
        assert {f["type"] for f in received} <= {"accepted", "token", "done", "error"}
        errors = [f for f in received if f["type"] == "error"]
        assert errors and all(f["code"] and f["message"] for f in errors)
        assert "internal" not in {f["code"] for f in errors}
        last = "".join(f["text"] for f in received if f.get("id") == "last" and f["type"] == "token")
        assert last == expected("fuzz me")

        statuses: dict[int, int] = {}
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                async with http.post(f"{stack.edge.api_url}/chat/completions", data=mutate(VALID_BODY, rng),
                                     headers={"Content-Type": "application/json"}) as r:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.content_type == "text/event-stream":  # a mutation that asked for a stream
                        assert r.status == 200 and (await r.text()).endswith("data: [DONE]\n\n")
                        continue
                    body = await r.json()
                    assert ("error" in body) == (r.status != 200), body
                    if r.status != 200:
                        assert body["error"]["message"] and body["error"]["code"]
            async with http.post(f"{stack.edge.api_url}/chat/completions", json=VALID_BODY) as r:
                assert r.status == 200
        assert set(statuses) <= {200, 400, 404, 413}, statuses
        assert statuses.get(400, 0) > 100
        # Nothing of the bad input stays behind (no leak): no request still in flight, no event
        # stream or subscription held for one, no job left in a worker.
        live = stack.edge.live
        await eventually(lambda: not stack.edge.gateway.client.following() and not stack.decode.worker._active)
        assert not stack.edge.gateway.client.following()
        assert [r for r in live._live.values() if not r.finished] == []
        assert not stack.prefill.worker._active and not stack.decode.worker._active


SEQS = [-1, 0, 1, 3, MAX_SEQ, -2, -(2**63), MAX_SEQ + 1, 2**64, 10**30, 1.5, "3", None, True, [], "x"]


async def test_mutated_resumes_get_a_clear_answer_or_an_ordered_replay_and_the_edge_keeps_serving(settings):
    """Resumes with odd ids, tokens and sequence numbers, at both doors: each gets an error naming
    the problem, unknown_request, rate_limited, or the events after its last_seq in order ending
    with the final one; never a reset connection, a 500 or a replay out of order."""
    rng = random.Random(20261130)
    settings = settings.replace(resume_client_burst=1000, resume_tenant_burst=1000)
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        async with await EdgeClient.connect(stack.url) as client:
            result = await client.complete([{"role": "user", "content": "fuzz my resume"}])
        whole = expected("fuzz my resume")
        good = {"type": "resume", "request_id": result.request_id, "resume_token": result.resume_token,
                "last_seq": 2}

        def odd_resume(n: int) -> dict:
            frame = {**good, "id": f"f{n}"}
            for _ in range(rng.randint(1, 2)):
                key = rng.choice(["request_id", "resume_token", "last_seq", "last_seq", "extra"])
                if key == "last_seq":
                    frame[key] = rng.choice(SEQS)
                elif rng.random() < 0.2:
                    frame.pop(key, None)
                else:
                    frame[key] = rng.choice(ODD + ["f" * 32, result.request_id[:-1] + "0", "A" * 22])
            return frame

        async with websockets.connect(stack.url) as ws:
            for n in range(150):
                frame = odd_resume(n)
                # infinities as JSON can say them: a number too large for a double
                await ws.send(json.dumps(frame).replace("-Infinity", "-1e999").replace("Infinity", "1e999"))
                replies = await asyncio.wait_for(frames_until_end(ws, f"f{n}"), 30)
                last = replies[-1]
                if last["type"] == "done":
                    tokens = [f for f in replies if f["type"] == "token"]
                    after = frame["last_seq"]
                    assert [f["seq"] for f in tokens] == [s for s in range(len(whole)) if s > after], frame
                    assert "".join(f["text"] for f in tokens) == whole[after + 1:]
                else:
                    assert last["type"] == "error" and last["code"] in ("invalid_frame", "unknown_request"), last
                    assert last["message"], last
            await ws.send(json.dumps({**good, "id": "last"}))
            assert "".join(f["text"] for f in await frames_until_end(ws, "last") if f["type"] == "token") == whole[3:]

        statuses: dict[int, int] = {}
        async with aiohttp.ClientSession() as http:
            for _ in range(150):
                rid = rng.choice([result.request_id] * 3 + ["f" * 32, "a" * 65, "x.y", "%00", "-" * 8])
                headers = {"X-Grokstack-Resume-Token": rng.choice([result.resume_token] * 3 + ["", "A" * 22, "é"])}
                seq = rng.choice(SEQS)
                if seq is not None:
                    headers["Last-Event-ID"] = str(seq)
                url = f"{stack.edge.api_url}/chat/completions/chatcmpl-{rid}/stream"
                async with http.get(url, headers=headers) as r:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 200:
                        events = await read_sse(r)
                        after = int(str(seq)) if seq is not None else -1
                        seqs, text = content_of(events)
                        assert seqs == [s for s in range(len(whole)) if s > after] and text == whole[after + 1:]
                        assert events[-1][1] == "[DONE]"
                    else:
                        error = (await r.json())["error"]
                        assert error["code"] and error["message"]
            assert set(statuses) <= {200, 400, 404}, statuses
            assert statuses.get(200) and statuses.get(400) and statuses.get(404), statuses
            async with http.post(f"{stack.edge.api_url}/chat/completions", json=VALID_BODY) as r:
                assert r.status == 200
