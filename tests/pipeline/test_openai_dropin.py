"""What vLLM's clients use beside chat: the completions API, logprobs, extra sampling fields,
tool messages in the history, the tokenizer endpoints, /health, /version and the OpenAPI
document, the SSE framing they read, over the whole pipeline (fake engines; the real engine's
side is in tests/integration/test_openai_dropin.py)."""

from __future__ import annotations

import json

import aiohttp

from edge import metrics as edge_metrics
from edge.live import CANCEL_MESSAGES
from edge.tenants import add_key
from edge.openapi import PATH, render
from services.lab.fake_engine import reply_for
from tests.pipeline.harness import eventually, running_stack
from tests.pipeline.test_chat_flow import engines, expected
from tests.pipeline.test_openai_api import api, ready, sdk


def text_expected(prompt: str) -> str:
    return reply_for(f"<|user|>{prompt}\n<|assistant|>".encode()).decode()


def ignored(field: str) -> float:
    return edge_metrics.REGISTRY.get_sample_value("grokstack_openai_ignored_fields_total", {"field": field}) or 0.0


def requests(status: str, error_type: str = "", api: str = "openai") -> float:
    labels = {"api": api, "status": status, "error_type": error_type}
    return edge_metrics.REGISTRY.get_sample_value("grokstack_requests_total", labels) or 0.0


async def test_completions_stream_and_not_with_logprobs_and_every_event_starts_with_data(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        client = sdk(stack)
        served, refused = requests("200"), requests("400", "invalid_request")
        whole = await client.completions.create(model="fake", prompt="once upon", max_tokens=100, logprobs=2)
        choice = whole.choices[0]
        assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
        assert choice.text == text_expected("once upon") and choice.finish_reason == "stop"
        assert choice.logprobs.tokens == list(choice.text) and len(choice.logprobs.top_logprobs[0]) == 2
        assert choice.logprobs.text_offset == list(range(len(choice.text)))
        assert whole.usage.completion_tokens == len(choice.text)

        stream = await client.completions.create(model="fake", prompt="once upon", max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text_expected("once upon")[:5]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 5

        # The framing vLLM's benchmark client reads: each event is one data line. A client that
        # says it reads SSE gets each event's id (its seq, for Last-Event-ID) after its data line;
        # without ids a content chunk's seq is its place among them.
        body = {"model": "fake", "prompt": "hi", "max_tokens": 4, "stream": True}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{api(stack)}/completions", json=body) as r:
                plain = [e for e in (await r.read()).decode().split("\n\n") if e]
            async with http.post(f"{api(stack)}/completions", json=body,
                                 headers={"Accept": "text/event-stream"}) as r:
                with_ids = [e for e in (await r.read()).decode().split("\n\n") if e]
        assert plain[-1] == with_ids[-1] == "data: [DONE]"
        assert all(e.startswith("data: {") and "\n" not in e for e in plain[:-1]), plain
        for event in with_ids[:-1]:
            data, event_id = event.split("\n")
            assert data.startswith("data: {") and event_id.startswith("id: "), event
        assert [int(e.split("\nid: ")[1]) for e in with_ids[:-2]] == list(range(len(with_ids) - 2))
        assert [json.loads(e[6:])["choices"][0]["text"] for e in plain[:4]] == list(text_expected("hi")[:4])
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{api(stack)}/completions", json={**body, "best_of": 3}) as r:
                assert r.status == 400
            async with http.get(f"{api(stack).removesuffix('/v1')}/health") as r:  # not a request: not counted
                assert r.status == 200
        # every generation request counted by its status and error type
        assert (requests("200") - served, requests("400", "invalid_request") - refused) == (4, 1)


class Recorder:
    """Stands in for a module's logger: keeps what it was told at warning level."""
    def __init__(self, real) -> None:
        self.real, self.warnings = real, []

    def warning(self, event: str, **fields) -> None:
        self.warnings.append((event, fields))
        self.real.warning(event, **fields)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


async def test_vllm_sampling_fields_tool_history_and_unknown_fields_are_taken(settings, monkeypatch):
    import edge.http_api

    recorder = Recorder(edge.http_api.log)
    monkeypatch.setattr(edge.http_api, "log", recorder)
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        client = sdk(stack)
        history = [{"role": "user", "content": "weather?"},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"id": "c1", "type": "function",
                                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "12 C"},
                   {"role": "user", "content": "and so?"}]
        before = ignored("my_router_hint")
        for _ in range(2):
            reply = await client.chat.completions.create(
                model="fake", messages=history, max_tokens=100, logprobs=True, top_logprobs=3, n=None,
                extra_body={"top_k": 20, "min_p": 0.1, "repetition_penalty": 1.05, "ignore_eos": False,
                            "my_router_hint": "x"})
            assert reply.choices[0].message.content == expected("and so?")
            content = reply.choices[0].logprobs.content
            assert [c.token for c in content] == list(expected("and so?"))
            assert all(len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode()) for c in content)
        assert ignored("my_router_hint") == before + 2  # counted each time...
        async with aiohttp.ClientSession() as http:  # no model: the one this edge serves, as vLLM does
            async with http.post(f"{api(stack)}/chat/completions",
                                 json={"messages": [{"role": "user", "content": "any model"}]}) as r:
                answer = await r.json()
        assert answer["choices"][0]["message"]["content"] == expected("any model")
        assert answer["model"] == settings.served.model_id
        logged = [w for w in recorder.warnings if w[1].get("field") == "my_router_hint"]
        assert len(logged) == 1, recorder.warnings  # ...logged once


async def test_several_choices_are_several_requests_answered_together(settings):
    """`n`: one request per choice, answered and streamed together with each choice's index, the
    usage's prompt counted once; not resumable, so cancelled when its client leaves."""
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        client = sdk(stack)
        question = [{"role": "user", "content": "three ways"}]
        one = await client.chat.completions.create(model="fake", messages=question, max_tokens=100)
        three = await client.chat.completions.create(model="fake", messages=question, max_tokens=100, n=3, seed=5)
        assert [(c.index, c.message.content, c.finish_reason) for c in three.choices] == [
            (i, expected("three ways"), "stop") for i in range(3)]
        assert three.usage.prompt_tokens == one.usage.prompt_tokens
        assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
        assert len({three.id, one.id}) == 2

        stream = await client.completions.create(model="fake", prompt="two", max_tokens=100, n=2, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        texts = ["", ""]
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
        assert texts == [text_expected("two")] * 2
        finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert sorted(c.choices[0].index for c in finished) == [0, 1]
        assert len({c.model_extra["grokstack"]["request_id"] for c in finished}) == 2  # each choice's own
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * len(text_expected("two"))

        # stream_options.continuous_usage_stats: each choice's usage so far on every chunk, as vLLM
        stream = await client.chat.completions.create(model="fake", messages=question, max_tokens=100, n=2,
                                                      stream=True, stream_options={"include_usage": True,
                                                                                   "continuous_usage_stats": True})
        chunks = [c async for c in stream]
        counted = [0, 0]
        for chunk in chunks[:-1]:
            (choice,) = chunk.choices
            counted[choice.index] += bool(choice.delta.content)
            assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (
                one.usage.prompt_tokens, counted[choice.index]), chunk
        assert counted == [one.usage.completion_tokens] * 2
        assert chunks[-1].usage.completion_tokens == 2 * one.usage.completion_tokens
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "x", "max_tokens": 3, "n": 2, "stream": True}
            async with http.post(f"{api(stack)}/completions", json=body,
                                 headers={"Accept": "text/event-stream"}) as r:
                events = [e for e in (await r.read()).decode().split("\n\n") if e]
                assert "X-Grokstack-Resume-Token" not in r.headers
        assert not any("\nid: " in e for e in events), events  # no ids to resume with

    async with running_stack(settings, *engines(settings, delay=0.2)) as stack:
        await ready(stack)
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "a long one " * 5, "max_tokens": 50, "n": 2, "stream": True}
            async with http.post(f"{api(stack)}/completions", json=body) as r:
                await r.content.readline()  # the first event: the choices are under way
                lives = [stack.edge.live.get(i) for i in list(stack.edge.live._live)]
        # gone well before the resume grace period would end a request of one choice
        assert stack.edge.live.config.resume_grace_s >= 10
        await eventually(lambda: stack.edge.live.in_flight == 0, timeout=5)
        assert len(lives) == 2 and all(live.events[-1].message == CANCEL_MESSAGES["choices_left"] for live in lives)


async def test_a_body_asking_more_choices_than_its_tenant_may_run_publishes_none(settings, tmp_path):
    keys_file = tmp_path / "keys.json"
    small = add_key(keys_file, "small", ["interactive", "standard", "batch"], 2)
    settings = settings.replace(api_keys_file=str(keys_file))
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {small}"}) as http:
            body = {"prompt": "x", "max_tokens": 3, "n": 3}
            async with http.post(f"{api(stack)}/completions", json=body) as r:
                assert r.status == 429 and (await r.json())["error"]["code"] == "too_many_requests"
            assert stack.edge.live._live == {}  # none of its choices was published (and cancelled)
            async with http.post(f"{api(stack)}/completions", json={**body, "n": 2}) as r:
                assert r.status == 200 and len((await r.json())["choices"]) == 2


async def test_min_tokens_count_the_whole_answer_across_prefill_and_decode(settings):
    """Prefill's first token counts toward min_tokens: decode asks its engine for the rest only
    (the fake engine holds its end back as vLLM's min_tokens does, padding with dots)."""
    settings = settings.replace(decode_prefill_max_tokens=0)  # prefill computes every first token
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        reply = await sdk(stack).completions.create(model="fake", prompt="hi", max_tokens=50,
                                                    extra_body={"min_tokens": 20})
    short = text_expected("hi")
    assert reply.choices[0].text == short + "." * (20 - len(short))
    assert reply.usage.completion_tokens == 20


async def test_tokenize_detokenize_health_version_models_and_the_openapi_document(settings):
    async with running_stack(settings, *engines(settings)) as stack:
        await ready(stack)
        base = api(stack).removesuffix("/v1")
        from transformers import AutoTokenizer
        reference = AutoTokenizer.from_pretrained(settings.served.model)
        async with aiohttp.ClientSession() as http:
            hello = {"model": settings.served.model_id, "prompt": "Hello world"}
            async with http.post(f"{base}/tokenize", json=hello) as r:
                tokens = await r.json()
                assert r.status == 200, tokens
            assert tokens["tokens"] == reference.encode("Hello world") and tokens["count"] == len(tokens["tokens"])
            assert tokens["max_model_len"] == settings.served.max_model_len
            chat = [{"role": "user", "content": "Hi"}]
            async with http.post(f"{base}/tokenize", json={"messages": chat, "return_token_strs": True}) as r:
                rendered = await r.json()
            assert rendered["tokens"] == list(reference.apply_chat_template(chat, add_generation_prompt=True,
                                                                            tokenize=True)["input_ids"])
            assert rendered["token_strs"] == reference.convert_ids_to_tokens(rendered["tokens"])
            async with http.post(f"{base}/detokenize", json={"tokens": tokens["tokens"]}) as r:
                assert (await r.json())["prompt"] == "Hello world"
            async with http.post(f"{base}/detokenize", json={"tokens": [10**9]}) as r:
                error = (await r.json())["error"]
                assert r.status == 400 and error["param"] == "tokens", error
            async with http.post(f"{base}/tokenize", json={"prompt": "x", "messages": chat}) as r:
                assert r.status == 400
            async with http.post(f"{base}/tokenize", json={"model": "fake", "prompt": "x"}) as r:
                assert r.status == 404  # the fake workers' model: its tokenizer is not this edge's
            async with http.get(f"{base}/health") as r:
                assert r.status == 200 and await r.read() == b""
            async with http.get(f"{base}/version") as r:
                assert (await r.json())["version"]
            async with http.get(f"{base}/v1/models") as r:
                (model,) = [m for m in (await r.json())["data"] if m["id"] == settings.served.model_id]
            assert model["root"] == settings.served.model and model["max_model_len"] == settings.served.max_model_len
            async with http.get(f"{base}/openapi.json") as r:
                served = await r.json()
        # Every route the app serves is in the document, with its methods, and nothing else.
        routes = {(info.get("formatter") or info.get("path"), resource_route.method.lower())
                  for resource_route in stack.edge.api.app().router.routes()
                  for info in [resource_route.resource.get_info()] if resource_route.method != "HEAD"}
        documented = {(path, method) for path, ops in served["paths"].items() for method in ops}
        assert documented == routes
        ids = [op["operationId"] for ops in served["paths"].values() for op in ops.values()]
        assert len(ids) == len(set(ids)), ids
        schemas = served["components"]["schemas"]
        assert {"ChatCompletionRequest", "CompletionRequest", "TokenizeRequest", "ErrorBody"} <= set(schemas)
        assert "top_k" in schemas["ChatCompletionRequest"]["properties"]


def test_the_checked_in_openapi_document_is_current():
    from edge.http_api import OpenAIApi

    assert PATH.read_text() == render(OpenAIApi.route_table()), \
        "run `grokstack openapi --write` and commit edge/openapi.json"
    assert json.loads(PATH.read_text())["openapi"] == "3.1.0"
