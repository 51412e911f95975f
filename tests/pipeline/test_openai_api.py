"""The OpenAI-compatible HTTP API with the official SDK and raw HTTP, against real NATS and Redis
(fake engines): answers, errors and their status codes, limits, authentication."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from edge import metrics as edge_metrics
from edge.client import chat_repl
from edge.protocol import MAX_SEQ
from edge.tenants import add_key
from services.lab.fake_engine import FakeEngine
from tests.pipeline.harness import eventually, running_stack
from tests.pipeline.test_chat_flow import engines, expected
from tests.sse import sse


async def ready(stack) -> None:
    async def check() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"{api(stack)}/../readyz") as r:
            return r.status == 200
    assert await eventually(check), "the API never became ready"


def api(stack) -> str:
    return stack.edge.api_url


def sdk(stack, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=api(stack), api_key=key, max_retries=0)


async def test_the_openai_sdk_gets_the_answer_streaming_and_not(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        client = sdk(stack)
        models = [m.id async for m in client.models.list()]
        assert "fake" in models
        question = [{"role": "user", "content": "hello api"}]
        reply = await client.chat.completions.create(model="fake", messages=question, max_tokens=100)
        assert reply.choices[0].message.content == expected("hello api")
        assert reply.choices[0].finish_reason == "stop" and reply.object == "chat.completion"
        assert reply.usage.completion_tokens == len(expected("hello api"))
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

        stream = await client.chat.completions.create(model="fake", messages=question, max_tokens=100,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected("hello api")
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text)
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
        extra = chunks[-1].model_extra["grokstack"]  # where the time went
        assert extra["usage"]["ttft_ms"] > 0 and "prefill_ms" in extra["timings"]

        # max_tokens cuts the answer: finish_reason length
        short = await client.chat.completions.create(model="fake", messages=question, max_tokens=3)
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


BAD_BODIES = [
    (b"{not json", 400, "invalid_json", None),
    (b'{"model": "fake"}', 400, "invalid_request", "messages"),
    (b'{"model": "fake", "messages": []}', 400, "invalid_request", "messages"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', 400,
     "invalid_request", "tools"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "use_beam_search": true}', 400,
     "invalid_request", "use_beam_search"),
    (b'{"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}', 400, "invalid_request", "messages"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "temperature": 5}', 400,
     "invalid_request", "temperature"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400,
     "invalid_request", "max_tokens"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "n": 17}', 400, "invalid_request", "n"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "   "}]}', 400, "invalid_request", None),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "priority": "vip"}', 400,
     "invalid_request", "priority"),
    (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found",
     "model"),
    # numbers past what the engine takes are refused at the door, naming the field
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "seed": 9223372036854775808}', 400,
     "invalid_request", "seed"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "seed": %d}' % 2**128, 400,
     "invalid_request", "seed"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "seed": -1}', 400, "invalid_request", "seed"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}', 400,
     "invalid_request", "temperature"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "top_p": -1e999}', 400,
     "invalid_request", "top_p"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}', 400,
     "invalid_request", "max_tokens"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 99999999999999999999}', 400,
     "invalid_request", "max_tokens"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x", "name": "' + b"n" * 65 + b'"}]}', 400,
     "invalid_request", "messages"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "user": "' + b"u" * 257 + b'"}', 400,
     "invalid_request", "user"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "metadata": {'
     + b",".join(b'"k%d": "v"' % i for i in range(17)) + b"}}", 400, "invalid_request", "metadata"),
    (b'{"model": "fake", "messages": [{"role": "user", "content": "x"}], "stop": ["' + b"s" * 65 + b'"]}', 400,
     "invalid_request", "stop"),
]


async def test_each_bad_input_gets_its_status_and_an_openai_error_body_and_the_edge_goes_on(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        url = f"{api(stack)}/chat/completions"
        async with aiohttp.ClientSession() as http:
            for body, status, code, param in BAD_BODIES:
                async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    error = (await r.json())["error"]
                    assert (r.status, error["code"]) == (status, code), (body, error)
                    assert error["message"] and error["type"]
                    if param:
                        assert error["param"] == param, (body, error)
            # a body over the limit is refused from its Content-Length, before it is parsed:
            # it is not JSON at all, and the answer is still 413, not 400
            huge = b"x" * (settings.edge.max_frame_bytes + 1)
            async with http.post(url, data=huge) as r:
                assert r.status == 413 and (await r.json())["error"]["code"] == "frame_too_large"

            async def chunked():  # no Content-Length: the reader stops at the limit
                for _ in range(settings.edge.max_frame_bytes // 65536 + 2):
                    yield b"y" * 65536
            async with http.post(url, data=chunked()) as r:
                assert r.status == 413
            async with http.get(url) as r:
                assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
            async with http.get(f"{api(stack)}/nothing") as r:
                assert r.status == 404 and (await r.json())["error"]["type"] == "invalid_request_error"
            async with http.post(url, json={"model": "fake", "messages": [{"role": "user", "content": "x"}]},
                                 headers={"X-Grokstack-Priority": "urgent"}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "priority"
            async with http.post(url, json={"model": "fake", "messages": [{"role": "user", "content": "x"}]},
                                 headers={"X-Grokstack-Region": "a/b" * 40}) as r:
                error = (await r.json())["error"]
                assert r.status == 400 and error["param"] == "region" and "X-Grokstack-Region" in error["message"]
            # no region "mars" is known: refused at once (edge/intake.py), naming it
            async with http.post(url, json={"model": "fake", "messages": [{"role": "user", "content": "x"}]},
                                 headers={"X-Grokstack-Region": "mars"}) as r:
                error = (await r.json())["error"]
                assert r.status == 400 and error["param"] == "region" and "mars" in error["message"]
        reply = await sdk(stack).chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "still here"}], max_tokens=50)
        assert reply.choices[0].message.content == expected("still here")


async def test_overload_gets_429_with_retry_after(settings):
    settings = settings.replace(max_inflight_per_edge=1)
    async with running_stack(settings, FakeEngine("prefill"), FakeEngine("decode", token_delay_s=0.05)) as stack:
        await ready(stack)
        client = sdk(stack)
        slow = await client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "a slow one " * 5}], stream=True)
        first = await slow.__anext__()
        assert first.choices[0].delta.content
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}])
        assert caught.value.status_code == 429 and int(caught.value.response.headers["Retry-After"]) >= 1
        rest = "".join([c.choices[0].delta.content or "" async for c in slow if c.choices])
        assert first.choices[0].delta.content + rest == expected("a slow one " * 5)


async def test_api_keys_map_to_tenants_and_their_priorities(settings, tmp_path, monkeypatch, capsys):
    keys_file = tmp_path / "keys.json"
    gold = add_key(keys_file, "gold", ["interactive", "standard", "batch"], 8)
    bulk = add_key(keys_file, "bulk", ["batch"], 8)
    assert gold not in keys_file.read_text() and "sha256:" in keys_file.read_text()  # hashes only
    settings = settings.replace(api_keys_file=str(keys_file))
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        # `grokstack chat --api-key`: the terminal chat sends the key
        typed = iter(["key please"])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(typed, None) or (_ for _ in ()).throw(EOFError))
        await asyncio.wait_for(chat_repl([stack.url], "batch", 64, 0.0, None, api_key=bulk), 30)
        assert expected("key please") in capsys.readouterr().out
        with pytest.raises(Exception, match="401|unauthorized|rejected"):
            await asyncio.wait_for(chat_repl([stack.url], "batch", 64, 0.0, None), 30)
        question = [{"role": "user", "content": "who am i"}]
        with pytest.raises(openai.AuthenticationError):
            await sdk(stack, "wrong").chat.completions.create(model="fake", messages=question)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{api(stack)}/chat/completions", json={"model": "fake", "messages": question}) as r:
                assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
        reply = await sdk(stack, gold).chat.completions.create(model="fake", messages=question)
        assert reply.choices[0].message.content == expected("who am i")
        # bulk may only send batch: it defaults to batch, and interactive is refused
        reply = await sdk(stack, bulk).chat.completions.create(model="fake", messages=question)
        assert reply.choices[0].message.content == expected("who am i")
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await sdk(stack, bulk).chat.completions.create(model="fake", messages=question,
                                                           extra_body={"priority": "interactive"})
        assert caught.value.body["param"] == "priority"


async def read_sse(response: aiohttp.ClientResponse, stop_after: int | None = None) -> list[tuple[int | None, str]]:
    """(id, data) of each event, until [DONE] or `stop_after` events."""
    events: list[tuple[int | None, str]] = []
    async for event_id, data in sse(response):
        events.append((event_id if data != "[DONE]" else None, data))
        if data == "[DONE]" or (stop_after is not None and len(events) >= stop_after):
            return events
    return events


def content_of(events: list[tuple[int | None, str]]) -> tuple[list[int], str]:
    seqs, text = [], ""
    for event_id, data in events:
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        for choice in chunk.get("choices", []):
            if choice["delta"].get("content"):
                seqs.append(event_id)
                text += choice["delta"]["content"]
    return seqs, text


async def test_an_sse_stream_resumes_after_a_dropped_connection_with_no_gap_or_repeat(settings):
    settings = settings.replace(resume_grace_s=5.0)
    question = "resume me please " * 3
    async with running_stack(settings, FakeEngine("prefill"), FakeEngine("decode", token_delay_s=0.02)) as stack:
        await ready(stack)
        body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": question}]}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{api(stack)}/chat/completions", json=body,
                                 headers={"Accept": "text/event-stream"}) as r:
                request_id, token = r.headers["X-Request-Id"], r.headers["X-Grokstack-Resume-Token"]
                before = await read_sse(r, stop_after=5)
            # the connection is gone; tokens keep coming meanwhile
            await asyncio.sleep(0.3)
            seqs_before, text_before = content_of(before)
            resume_url = f"{api(stack)}/chat/completions/chatcmpl-{request_id}/stream"
            # the request id alone, or with a wrong token, is answered as an unknown id
            refusals = []
            for headers in ({}, {"X-Grokstack-Resume-Token": "A" * 22},
                            {"X-Grokstack-Resume-Token": stack.edge.server.guard.token("other", request_id)}):
                async with http.get(resume_url, headers=headers) as r:
                    refusals.append((r.status, (await r.json())["error"]))
            async with http.get(resume_url, headers={"Last-Event-ID": str(seqs_before[-1]),
                                                     "X-Grokstack-Resume-Token": token}) as r:
                assert r.status == 200 and r.headers["X-Grokstack-Resume-Token"] == token
                after = await read_sse(r)
            # a client that saw nothing can replay the whole answer while it is retained (token in the query)
            async with http.get(f"{resume_url}?resume_token={token}") as r:
                whole = content_of(await read_sse(r))[1]
            unknown_id = "0" * 32
            its_token = stack.edge.server.guard.token("public", unknown_id)  # a valid token, an unknown id
            async with http.get(f"{api(stack)}/chat/completions/chatcmpl-{unknown_id}/stream",
                                headers={"X-Grokstack-Resume-Token": its_token}) as r:
                assert r.status == 404
                unknown = (await r.json())["error"]
        assert unknown["code"] == "unknown_request"
        for status, error in refusals:  # nothing tells a prober the id exists
            assert status == 404 and error == {**unknown, "message": unknown["message"].replace(unknown_id, request_id)}
        seqs_after, text_after = content_of(after)
        assert seqs_before + seqs_after == list(range(len(seqs_before) + len(seqs_after)))
        assert text_before + text_after == expected(question) == whole
        assert after[-1][1] == "[DONE]"
        assert stack.decode.worker.counters.cancelled == 0


async def test_an_sse_client_that_goes_away_cancels_its_request_after_the_grace(settings):
    settings = settings.replace(resume_grace_s=0.5)
    decode = FakeEngine("decode", token_delay_s=0.05)
    async with running_stack(settings, FakeEngine("prefill"), decode) as stack:
        await ready(stack)
        body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "long " * 40}]}
        disconnects = edge_metrics.REGISTRY.get_sample_value("grokstack_client_disconnects_total") or 0.0
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{api(stack)}/chat/completions", json=body) as r:
                await read_sse(r, stop_after=3)
        await eventually(lambda: stack.decode.worker.counters.cancelled == 1)
        assert edge_metrics.REGISTRY.get_sample_value("grokstack_client_disconnects_total") == disconnects + 1
        assert decode.aborted == 1


async def test_sse_resume_takes_any_last_event_id_in_bounds_and_refuses_the_rest_and_is_rate_limited(settings):
    """Last-Event-ID in [-1, MAX_SEQ] gives the events after it in order, then the end (even past
    the end); anything else is a 400 naming it, the connection answered, not reset. Resumes from
    one address are rate-limited (429 with Retry-After)."""
    async with running_stack(settings.replace(resume_client_burst=40), *engines(settings)) as stack:
        await ready(stack)
        body = {"model": "fake", "messages": [{"role": "user", "content": "count on me"}]}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{api(stack)}/chat/completions", json=body) as r:
                assert r.status == 200
                request_id, token = r.headers["X-Request-Id"], r.headers["X-Grokstack-Resume-Token"]
            url = f"{api(stack)}/chat/completions/chatcmpl-{request_id}/stream"
            good = {}
            for last in ("-1", "0", "3", str(MAX_SEQ)):
                async with http.get(url, headers={"Last-Event-ID": last, "X-Grokstack-Resume-Token": token}) as r:
                    assert r.status == 200, last
                    good[last] = await read_sse(r)
            async with http.get(f"{url}?last_event_id=3&resume_token={token}") as r:
                by_query = await read_sse(r)
            bad = {}
            for last in ("-2", "-99999999", str(MAX_SEQ + 1), "9" * 5000, "1.5", "3 4", "٣", "1_0", "0x10", "abc"):
                async with http.get(url, headers={"Last-Event-ID": last, "X-Grokstack-Resume-Token": token}) as r:
                    bad[last] = (r.status, (await r.json())["error"])
            async with http.get(f"{url}?last_event_id=-5&resume_token={token}") as r:
                bad["query"] = (r.status, (await r.json())["error"])
        whole = content_of(good["-1"])
        assert whole[1] == expected("count on me") and whole[0] == list(range(len(whole[0])))
        assert content_of(good["0"])[0] == whole[0][1:] and content_of(good["3"])[0] == whole[0][4:]
        assert content_of(by_query) == content_of(good["3"])
        past = good[str(MAX_SEQ)]
        assert content_of(past) == ([], "") and past[-1][1] == "[DONE]"
        assert json.loads(past[-2][1])["choices"][0]["finish_reason"] == "stop"  # the end, still
        for last, (status, error) in bad.items():
            assert status == 400 and error["code"] == "invalid_request", (last, error)
            assert error["param"] in ("Last-Event-ID", "last_event_id"), (last, error)
        # rate-limited per address: a burst of 40, then 429 with Retry-After; others unaffected
        async with aiohttp.ClientSession() as http:
            statuses = []
            for _ in range(45):
                async with http.get(url, headers={"X-Grokstack-Resume-Token": "A" * 22}) as r:
                    statuses.append((r.status, r.headers.get("Retry-After")))
            assert {s for s, _ in statuses[:len(statuses) - 5]} <= {404, 429}
            assert statuses[-1][0] == 429 and int(statuses[-1][1]) >= 1
            async with http.post(f"{api(stack)}/chat/completions", json=body) as r:
                assert r.status == 200
