"""Short prompts handed to decode unprefilled (GROKSTACK_DECODE_PREFILL_MAX_TOKENS): the decode
engine computes them in its batch and sends the first token itself; longer prompts still get the
prefill engine's pass. Real NATS and Redis, fake engines (the real engine's side is in
tests/integration/test_vllm_stack.py)."""

from __future__ import annotations

from edge.client import EdgeClient
from inference import metrics
from services.processes import start_worker
from tests.pipeline.harness import eventually, running_stack
from tests.pipeline.test_chat_flow import expected
from tests.pipeline.test_migration import die, engines_on_one_store

UP_TO = 96  # prompt tokens (the fake engine's tokens are bytes)
SHORT = "hello there"  # 33 bytes with the chat template's marks
LONG = "a question long enough that its prompt, with the chat template's marks, is more than ninety-six bytes"


async def test_a_short_prompt_is_computed_by_decode_and_a_long_one_by_prefill(settings):
    settings = settings.replace(decode_prefill_max_tokens=UP_TO)
    engine = engines_on_one_store(settings)
    prefill, decode = engine("prefill"), engine("decode")
    handed = metrics.PROMPTS_IN_DECODE.labels("interactive")
    before = handed._value.get()
    queried, hits = metrics.KV_QUERY_TOKENS.labels("decode"), metrics.KV_HIT_TOKENS.labels("decode")
    queried_before, hits_before = queried._value.get(), hits._value.get()
    async with running_stack(settings, prefill, decode) as stack:
        async with await EdgeClient.connect(stack.url) as client:
            frames = [f async for f in client.stream([{"role": "user", "content": SHORT}], max_tokens=100)]
            assert (prefill.started, decode.started) == (0, 1)
            one = await client.complete([{"role": "user", "content": SHORT + "!"}], max_tokens=1)
            # the next turn of the conversation: its first turn's blocks, saved by decode, are loaded
            turn2 = [{"role": "user", "content": SHORT}, {"role": "assistant", "content": expected(SHORT)},
                     {"role": "user", "content": "and again"}]
            second = await client.complete(turn2, max_tokens=100)
            assert prefill.started == 0
            long = await client.complete([{"role": "user", "content": LONG}], max_tokens=300)
            assert (prefill.started, decode.started) == (1, 4)
    tokens = [f for f in frames if f["type"] == "token"]
    assert [t["seq"] for t in tokens] == list(range(len(tokens)))  # decode's first event is seq 0
    assert "".join(t["text"] for t in tokens) == expected(SHORT)
    done = frames[-1]
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == len(tokens)
    assert done["timings"]["prefill_ms"] > 0  # decode measured its own time to the first token
    assert one.text == expected(SHORT + "!")[:1] and one.done["finish_reason"] == "length"
    assert second.text == expected("and again") and second.done["usage"]["cached_prompt_tokens"] > 0
    assert long.text == expected(LONG) and long.done["usage"]["cached_prompt_tokens"] == 0
    assert handed._value.get() == before + 3
    # decode looked up the handed-on prompts itself: what it found is part of what it looked up
    found = hits._value.get() - hits_before
    assert 0 < found <= queried._value.get() - queried_before


async def test_a_handed_on_prompts_answer_survives_its_decode_worker(settings):
    """The decode worker that computed the prompt dies mid-answer: the spare continues from the
    capture (which holds every event from seq 0), every token once, in order."""
    settings = settings.replace(decode_prefill_max_tokens=UP_TO, ack_wait_s=1.0)
    engine = engines_on_one_store(settings)
    question = "outlive your worker"
    prefill = engine("prefill")
    async with running_stack(settings, prefill, engine("decode")) as stack:
        spare = await start_worker(settings.replace(worker_id=f"{settings.bus.worker_id}-spare"), "decode",
                                   engine("decode"))
        victim = None
        try:
            async with await EdgeClient.connect(stack.url) as client:
                frames = []
                async for frame in client.stream([{"role": "user", "content": question}], max_tokens=300):
                    frames.append(frame)
                    if sum(f["type"] == "token" for f in frames) == 5 and victim is None:
                        victim = next(w for w in (stack.decode, spare) if w.worker._active)
                        await die(victim)
            survivor = spare if victim is stack.decode else stack.decode
            await eventually(lambda: survivor.worker.counters.served == 1)
        finally:
            if spare is not victim:
                await spare.stop(1.0)
    assert victim is not None and prefill.started == 0
    tokens = [f for f in frames if f["type"] == "token"]
    assert frames[-1]["type"] == "done", frames[-1]
    assert [t["seq"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens) == expected(question)
