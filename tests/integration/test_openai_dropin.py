"""The stack as a drop-in for vLLM's own server, with the real engine: vLLM's serving benchmark
client (driven as a library) on both endpoints, the openai SDK with vLLM's extra sampling
fields, tool messages in the history, the legacy completions call, logprobs."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import openai
import pytest

from tests.integration.conftest import API, MAX_TOKENS, TEXT

pytestmark = pytest.mark.engine

BENCH_PROMPTS, BENCH_OUTPUT = 6, 24


def sdk(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.api_url, api_key="none", max_retries=0)


@pytest.mark.parametrize("backend, endpoint", [("openai-chat", "/v1/chat/completions"),
                                               ("openai", "/v1/completions")])
async def test_vllm_benchmark_client_serves_every_request_with_ignore_eos(vllm_stack, backend, endpoint):
    from vllm.benchmarks.serve import add_cli_args, main_async
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    # No --model: the client reads it, and its tokenizer's source (`root`), from /v1/models.
    args = parser.parse_args([
        "--backend", backend, "--base-url", vllm_stack.api_url.removesuffix("/v1"), "--endpoint", endpoint,
        "--dataset-name", "random", "--random-input-len", "48", "--random-output-len", str(BENCH_OUTPUT),
        "--num-prompts", str(BENCH_PROMPTS), "--max-concurrency", "3", "--ignore-eos", "--disable-tqdm",
        "--seed", "7", "--ready-check-timeout-sec", "60"])
    result = await main_async(args)
    assert (result["completed"], result["failed"]) == (BENCH_PROMPTS, 0), result.get("errors")
    # --ignore-eos reached vLLM: every answer ran to its max_tokens
    assert result["total_output_tokens"] == BENCH_PROMPTS * BENCH_OUTPUT


async def test_the_legacy_completions_call_gives_the_engines_greedy_text(vllm_stack, reference):
    client = sdk(vllm_stack)
    model = (await client.models.list()).data[0].id
    whole = await client.completions.create(model=model, prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0)
    assert whole.choices[0].text == reference["text"].text
    assert whole.usage.prompt_tokens == len(reference["text"].prompt_token_ids)
    stream = await client.completions.create(model=model, prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == reference["text"].text


async def test_sampling_fields_reach_the_engine_and_logprobs_come_back(vllm_stack, reference):
    client = sdk(vllm_stack)
    model = (await client.models.list()).data[0].id
    # top_k 1 at temperature 1 is greedy: the engine's greedy answer, if top_k reached it
    top1 = await client.chat.completions.create(model=model, messages=API, max_tokens=MAX_TOKENS, temperature=1.0,
                                                seed=3, extra_body={"top_k": 1, "min_p": 0.0,
                                                                    "repetition_penalty": 1.0})
    assert top1.choices[0].message.content == reference["api"].text
    # logprobs: greedy picks the most likely token, so each chosen token is its place's first
    # alternative, with the same log probability (from prefill's engine for the first token,
    # decode's for the rest)
    greedy = await client.chat.completions.create(model=model, messages=API, max_tokens=MAX_TOKENS, temperature=0,
                                                  logprobs=True, top_logprobs=2)
    content = greedy.choices[0].logprobs.content
    assert "".join(c.token for c in content) == greedy.choices[0].message.content == reference["api"].text
    assert len(content) == greedy.usage.completion_tokens
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token, c
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-4)
        assert c.logprob <= 0 and c.top_logprobs[1].logprob <= c.logprob + 1e-4
    # logit_bias reaches the sampler: the greedy answer's first token, banned, is not the first one
    first = content[0].token
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{vllm_stack.api_url.removesuffix('/v1')}/tokenize",
                             json={"prompt": first, "add_special_tokens": False}) as r:
            (first_id,) = (await r.json())["tokens"]
    banned = await client.chat.completions.create(model=model, messages=API, max_tokens=1, temperature=0,
                                                  logit_bias={str(first_id): -100}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != first
    # ...in prefill's engine. Decode's speculates, and vLLM refuses logit_bias and min_p there (as
    # `vllm serve` with speculation does): a 400 naming it, at once, not five failed deliveries.
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        await client.chat.completions.create(model=model, messages=API, max_tokens=4, temperature=0,
                                             logit_bias={str(first_id): -100})


async def test_tool_messages_in_the_history_are_rendered_as_the_edge_tokenizes_them(vllm_stack):
    client = sdk(vllm_stack)
    model = (await client.models.list()).data[0].id
    history = [{"role": "user", "content": "What is the weather in Oslo?"},
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees and rain"},
               {"role": "user", "content": "Should I take an umbrella?"}]
    reply = await client.chat.completions.create(model=model, messages=history, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{vllm_stack.api_url.removesuffix('/v1')}/tokenize", json={"messages": history}) as r:
            tokenized = await r.json()
    # the edge's tokenizer and the prefill worker's engine render the same prompt
    assert tokenized["count"] == reply.usage.prompt_tokens


async def test_several_choices_sample_as_vllms_parallel_sampling(vllm_stack, reference):
    """n > 1 through the real engines: greedy, every choice is the engine's greedy answer;
    sampled, the choices differ (each its own request, with its own seed: seed + i). That choice i
    equals a lone request with seed + i is not held here: with speculation switched by batch size
    (SpecConfig.spec_max_batch), a seeded answer depends on what else the engine was running."""
    client = sdk(vllm_stack)
    model = (await client.models.list()).data[0].id
    greedy = await client.completions.create(model=model, prompt=TEXT, max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [(c.index, c.text) for c in greedy.choices] == [(0, reference["text"].text), (1, reference["text"].text)]
    assert greedy.usage.prompt_tokens == len(reference["text"].prompt_token_ids)
    sampled = await client.chat.completions.create(model=model, messages=API, max_tokens=12, temperature=1.0,
                                                   seed=11, n=3)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.message.content for c in sampled.choices}) > 1
    assert sampled.usage.prompt_tokens == len(reference["api"].prompt_token_ids)
    lengths = [12 if c.finish_reason == "length" else None for c in sampled.choices]
    assert 3 <= sampled.usage.completion_tokens <= 3 * 12  # the three answers' tokens, summed
    if None not in lengths:
        assert sampled.usage.completion_tokens == 3 * 12


async def test_one_request_is_one_trace_across_the_edge_and_worker_processes(vllm_stack, otlp_receiver):
    """Each process exports its spans over OTLP; linked only by the traceparent in the NATS
    headers, they make one tree under the client's own span. vLLM's own span of the request
    (`llm_request`, in each worker's engine) hangs under the worker's."""
    trace_id, client_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    # a prompt of its own (no block of it cached yet: prefill writes them all, decode reads them)
    prompt = f"Trace {uuid.uuid4().hex}: list five colours of the rainbow, then five fruits of the same colours."
    body = {"model": (await sdk(vllm_stack).models.list()).data[0].id,
            "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{vllm_stack.api_url}/chat/completions", json=body,
                             headers={"traceparent": f"00-{trace_id}-{client_span}-01"}) as r:
            assert r.status == 200

    def spans() -> dict[str, object]:
        return {s.span_id: s for s in otlp_receiver.spans if s.trace_id == trace_id}
    wanted = {("grokstack-edge", "edge request"), ("grokstack-prefill", "prefill"), ("grokstack-prefill", "kv write"),
              ("grokstack-decode", "decode"), ("grokstack-decode", "kv read"),
              ("grokstack-prefill", "llm_request"), ("grokstack-decode", "llm_request")}
    for _ in range(60):  # the processes export in batches, every few seconds
        if wanted <= {(s.service, s.name) for s in spans().values()}:
            break
        await asyncio.sleep(0.5)
    tree = spans()
    named = {(s.service, s.name): s for s in tree.values()}
    assert wanted <= set(named), sorted(set(named))
    edge, prefill, decode = named[("grokstack-edge", "edge request")], named[("grokstack-prefill", "prefill")], \
        named[("grokstack-decode", "decode")]
    assert edge.parent_id == client_span
    assert prefill.parent_id == edge.span_id and decode.parent_id == prefill.span_id
    assert named[("grokstack-prefill", "kv write")].parent_id == prefill.span_id
    assert named[("grokstack-decode", "kv read")].parent_id == decode.span_id
    assert named[("grokstack-prefill", "llm_request")].parent_id == prefill.span_id
    assert named[("grokstack-decode", "llm_request")].parent_id == decode.span_id
    for span in tree.values():  # one tree under the client's span
        assert span.parent_id == client_span or span.parent_id in tree, (span.service, span.name)
