"""The simulated engine: its timing follows the calibration, its text the FakeEngine contract.

Time is virtual (VirtualClock): steps pass at once and are added up, so nothing here depends on
how busy the machine is."""

from __future__ import annotations

import asyncio

import pytest

from bus.messages import ChatMessage, SamplingSpec
from kv_store.keys import kv_request
from kv_store.records import KvRequest
from services.lab.sim_batcher import VirtualClock
from services.lab.sim_calibration import BATCH, DEFAULT, Calibration
from services.lab.sim_engine import SimEngine

SAMPLING = SamplingSpec(max_tokens=64, temperature=0.0)
CAL = Calibration.fit(0.070, 0.150, 2.0, source="test")


def engine(role: str = "direct", max_num_seqs: int = 16, **kw) -> tuple[SimEngine, VirtualClock]:
    clock = VirtualClock()
    return SimEngine(role, kw.pop("calibration", CAL), max_num_seqs, clock=clock, **kw), clock


async def run(eng: SimEngine, prompt: list[int], max_tokens: int, kv: KvRequest | None = None) -> list[int]:
    out: list[int] = []
    async for chunk in eng.generate("r", prompt, SAMPLING, max_tokens, kv):
        out += chunk.token_ids
    return out


def prompt(text: str, eng: SimEngine) -> list[int]:
    return eng.render_chat([ChatMessage("user", text)])


def test_the_fit_reproduces_the_three_measurements():
    assert CAL.step_s(1) == pytest.approx(0.070)
    assert CAL.step_s(BATCH) == pytest.approx(0.150)
    assert CAL.step_s(1, 512) == pytest.approx(2.0)
    assert CAL.step_s(8) > CAL.step_s(4) > CAL.step_s(1)  # grows with the batch, as configured
    assert CAL.step_s(8) - CAL.step_s(4) == pytest.approx(4 * CAL.step_per_seq_s)


def test_the_calibration_survives_a_round_trip_through_its_file(tmp_path):
    CAL.save(tmp_path / "cal.json")
    assert Calibration.load(tmp_path / "cal.json") == CAL
    assert Calibration.load(tmp_path / "missing.json") is DEFAULT


@pytest.mark.parametrize("streams", [1, BATCH])
async def test_tokens_per_second_match_the_calibration(streams):
    eng, clock = engine(max_num_seqs=BATCH)
    prompts = [prompt(f"question {i}", eng) for i in range(streams)]
    outs = await asyncio.gather(*(run(eng, p, 65) for p in prompts))
    assert all(len(o) == 65 for o in outs)
    decode = [s for s in eng.batcher.steps if s.prefill_tokens == 0]
    assert {s.seqs for s in decode} == {streams}  # all decoded together, every step
    measured = sum(s.seqs for s in decode) / sum(s.seconds for s in decode)
    expected = {1: 1 / 0.070, BATCH: BATCH / 0.150}[streams]
    # the linear model reproduces its two decode measurements exactly, up to float rounding
    assert measured == pytest.approx(expected, rel=1e-9)
    # and the whole run took its prompts' step plus one step per further token
    prefill_tokens = sum(len(p) for p in prompts)
    assert clock.now == pytest.approx(CAL.step_s(streams, prefill_tokens) + 64 * CAL.step_s(streams))


async def test_a_prefill_costs_the_prompts_step_and_gives_one_token():
    eng, clock = engine("prefill")
    long = list(b"x" * 500) + list(b"<|assistant|>")
    first = await run(eng, long, 1)
    assert len(first) == 1
    assert clock.now == pytest.approx(CAL.step_s(1, len(long)))


async def test_prompt_bytes_are_charged_as_the_models_tokens():
    cal = Calibration.fit(0.070, 0.150, 2.0, source="test", tokens_per_prompt_byte=0.5)
    eng, clock = engine("prefill", calibration=cal)
    await run(eng, list(b"x" * 99) + list(b"<|assistant|>"), 1)  # 112 bytes: 56 tokens
    assert eng.batcher.steps[0].prefill_tokens == 56
    assert clock.now == pytest.approx(cal.step_s(1, 56))


async def test_long_prompts_are_chunked_by_the_step_token_budget():
    cal = Calibration(0.01, 0.001, 0.0001, max_batched_tokens=100, source="test")
    eng, clock = engine(calibration=cal)
    await run(eng, list(b"y" * 250), 2)
    assert [s.prefill_tokens for s in eng.batcher.steps] == [100, 100, 50, 0]


async def test_max_num_seqs_bounds_the_batch_and_the_rest_wait_inside():
    eng, _ = engine(max_num_seqs=4)
    outs = await asyncio.gather(*(run(eng, prompt(f"q{i}", eng), 10) for i in range(10)))
    assert all(len(o) == 10 for o in outs)
    assert max(s.seqs for s in eng.batcher.steps) == 4


async def test_the_kv_capacity_bounds_the_batch_too():
    cal = Calibration(0.01, 0.001, 0.0001, kv_capacity_tokens=200, source="test")
    eng, _ = engine(calibration=cal)
    outs = await asyncio.gather(*(run(eng, list(b"z" * 50), 40) for _ in range(5)))  # 90 KV tokens each
    assert all(len(o) == 40 for o in outs)
    assert max(s.seqs for s in eng.batcher.steps) == 2


async def test_answers_are_deterministic_and_as_long_as_asked():
    a, _ = engine()
    b, _ = engine()
    p = prompt("Hello there", a)
    first, second = await run(a, p, 300), await run(b, p, 300)
    assert first == second and len(first) == 300
    assert bytes(first).startswith(b"echo: ereht olleH")


async def test_a_migrated_decode_continues_with_the_same_tokens():
    class Blocks:  # the BlockStore calls the KV contract makes, in memory
        def __init__(self):
            self.keys = set()

        def save(self, items):
            self.keys |= {k for k, _ in items}

        def present_prefix(self, keys):
            n = 0
            while n < len(keys) and keys[n] in self.keys:
                n += 1
            return n

    store = Blocks()
    pre, _ = engine("prefill", store=store)
    dec, _ = engine("decode", store=store)
    p = prompt("Tell me about queues, please", pre)
    first, report = [], None
    async for chunk in pre.generate("r", p, SAMPLING, 1, kv_request("r", "t")):
        first += chunk.token_ids
        report = chunk.kv or report
    kv = kv_request("r", "t", report.handle)
    whole = await run(dec, p + first, 80, kv)
    resumed = await run(dec, p + first + whole[:30], 50, kv)  # another worker, after 30 sent tokens
    assert resumed == whole[30:]
    assert first + whole == await run(engine()[0], p, 81)  # the same as one engine alone
    # the decode computed only what the KV handle did not cover
    covered = len(report.handle.keys) * 16
    assert covered > 0 and dec.batcher.steps[0].prefill_tokens == len(p) + 1 - covered


async def test_cancelling_a_stream_frees_its_place_in_the_batch():
    eng, _ = engine(max_num_seqs=1)
    gen = eng.generate("a", prompt("first", eng), SAMPLING, 1000)
    await gen.__anext__()
    await gen.aclose()
    assert eng.aborted == 1 and not eng.batcher.running
    assert len(await run(eng, prompt("second", eng), 5)) == 5
