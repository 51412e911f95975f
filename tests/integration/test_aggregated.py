"""A real aggregated worker (one vLLM engine prefills and decodes) in its own region, reached
through the running stack's edge: the same greedy answer, the KV of earlier turns from Redis."""

from __future__ import annotations

import openai
import pytest

from edge.client import EdgeClient
from services.supervisor import kill_group
from tests.integration.conftest import API, MAX_TOKENS, spawn_worker, wait_for_heartbeat

pytestmark = pytest.mark.engine
REGION = "agg"  # its own region, so the disaggregated workers never take these requests


@pytest.fixture(scope="module")
def aggregated_worker(vllm_stack):
    # n-gram speculation on (the default on CPU too, said here so it stays on), so the real
    # engine's speculative path is held to the same greedy answer
    settings = vllm_stack.settings.replace(region=REGION, worker_id=f"{vllm_stack.settings.bus.worker_id}-agg",
                                           engine_step_lock="", spec_method="ngram")
    proc = spawn_worker(vllm_stack, settings, "aggregated")
    try:
        wait_for_heartbeat(settings, "aggregated", proc)
        assert proc.poll() is None, f"the aggregated worker exited; see {vllm_stack.logs}"
        yield proc
    finally:
        kill_group(proc)


async def test_an_aggregated_worker_gives_the_engines_answer_over_both_doors(vllm_stack, aggregated_worker,
                                                                            reference):
    client = openai.AsyncOpenAI(base_url=vllm_stack.api_url, api_key="x", max_retries=0, timeout=120)
    reply = await client.chat.completions.create(
        model=vllm_stack.settings.served.model_id, messages=API, max_tokens=MAX_TOKENS, temperature=0,
        extra_headers={"X-Grokstack-Region": REGION})
    assert reply.choices[0].message.content == reference["api"].text
    async with await EdgeClient.connect(vllm_stack.url) as ws:
        turn2 = [*API, {"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": "Which of them is the longest?"}]
        result = await ws.complete(turn2, max_tokens=16, temperature=0, region=REGION)
    assert result.error is None and result.text
    # the first turn's prompt blocks were saved by this worker and loaded for the second turn
    assert result.done["usage"]["cached_prompt_tokens"] > 0
    assert result.done["timings"]["decode_queue_ms"] == 0  # no decode stage: one engine did both
    assert '"speculative": "ngram"' in (vllm_stack.logs / f"{vllm_stack.settings.bus.worker_id}-agg.log").read_text()


async def test_a_stream_whose_region_dies_goes_on_in_another_with_the_same_greedy_text(vllm_stack, aggregated_worker,
                                                                                      reference):
    """The real engine of region `agg` is killed mid-answer: the edge sees the region die (its
    worker's heartbeats stop), publishes the request to its home region as the next attempt with the
    tokens sent so far in the prompt, and the client gets the rest from the other engines: every
    token once, and the text of an uninterrupted greedy run. Last in this module: it kills the worker."""
    async with await EdgeClient.connect(vllm_stack.url) as ws:
        frames, killed = [], False
        async for frame in ws.stream(API, max_tokens=MAX_TOKENS, temperature=0, region=REGION):
            frames.append(frame)
            if not killed and sum(f["type"] == "token" for f in frames) == 5:
                kill_group(aggregated_worker)
                killed = True
    assert killed and frames[0]["route"] == "requested" and frames[-1]["type"] == "done", frames[-1]
    tokens = [f for f in frames if f["type"] == "token"]
    assert [f["seq"] for f in tokens] == list(range(len(tokens)))
    assert "".join(f["text"] for f in tokens) == reference["api"].text
    usage = frames[-1]["usage"]
    assert (usage["region"], usage["route"]) == (vllm_stack.settings.bus.region, "failover")
    taken_over = [line for line in (vllm_stack.logs / "edge.log").read_text().splitlines()
                  if "request taken over by another region" in line]
    assert taken_over and f'"dead_region": "{REGION}"' in taken_over[-1]
