"""The one builder of a request's final event, as each pool calls it: every field of the event
is pinned to what that pool measured."""

from __future__ import annotations

from bus.messages import Cost, FinalEvent, KvTransfer, PrefillStats, Timings, Usage
from inference.final import DecodeStage, PromptStage, final_event
from kv_store.records import TransferStats

PREFILL = PrefillStats(worker_id="w", queue_ms=30.0, prefill_ms=200.0, cached_tokens=64, done_at=1000.0,
                       kv_bytes_written=4096, kv_write_ms=5.0, gpu_s=0.2, usd=0.0002)
COST = Cost(prefill_gpu_s=0.2, decode_gpu_s=0.6, usd=0.0008)
READ = TransferStats(blocks=6, bytes=3072, ms=3.5, failed=0)


def test_a_prefill_whose_first_token_ended_the_answer():
    event = final_event("r1", 1, "stop", completion_tokens=1, prompt=PromptStage.of(100, PREFILL),
                        cost=Cost(prefill_gpu_s=PREFILL.gpu_s, usd=PREFILL.usd))
    assert event == FinalEvent(
        request_id="r1", seq=1, finish_reason="stop",
        usage=Usage(prompt_tokens=100, cached_prompt_tokens=64, completion_tokens=1),
        timings=Timings(queue_ms=30.0, prefill_ms=200.0),
        kv=KvTransfer(bytes_written=4096, write_ms=5.0),
        cost=Cost(prefill_gpu_s=0.2, usd=0.0002))


def test_a_decode_that_loaded_the_prompts_kv():
    decode = DecodeStage(decode_ms=800.0, loaded_tokens=96, read=READ, queue_ms=12.0,
                         reason="1 of 7 blocks missing from the store")
    event = final_event("r1", 9, "length", 8, prompt=PromptStage.of(100, PREFILL), cost=COST, decode=decode)
    assert event == FinalEvent(
        request_id="r1", seq=9, finish_reason="length",
        usage=Usage(prompt_tokens=100, cached_prompt_tokens=64, completion_tokens=8),
        timings=Timings(queue_ms=30.0, prefill_ms=200.0, decode_queue_ms=12.0, decode_ms=800.0),
        # the connector's reason shows only when decode recomputed the prompt
        kv=KvTransfer(bytes_written=4096, write_ms=5.0, bytes_read=3072, read_ms=3.5, loaded_tokens=96),
        cost=COST)


def test_a_decode_that_recomputed_the_prompt_used_nothing_cached():
    decode = DecodeStage(decode_ms=800.0, loaded_tokens=0, queue_ms=12.0, recomputed=True,
                         reason="handle keys do not match the request's tokens")
    event = final_event("r1", 9, "stop", 8, prompt=PromptStage.of(100, PREFILL), cost=COST, decode=decode)
    assert event.usage == Usage(prompt_tokens=100, cached_prompt_tokens=0, completion_tokens=8)
    assert event.kv == KvTransfer(bytes_written=4096, write_ms=5.0, loaded_tokens=0, recomputed=True,
                                  reason="handle keys do not match the request's tokens")


def test_an_aggregated_worker_reports_both_stages_from_its_own_record():
    prompt = PromptStage(tokens=100, cached_tokens=48, queue_ms=30.0, prefill_ms=150.0,
                         written=TransferStats(blocks=6, bytes=6144, ms=2.5))
    event = final_event("r1", 20, "stop", 19, prompt=prompt, cost=COST,
                        decode=DecodeStage(decode_ms=900.0, loaded_tokens=48, read=READ))
    assert event == FinalEvent(
        request_id="r1", seq=20, finish_reason="stop",
        usage=Usage(prompt_tokens=100, cached_prompt_tokens=48, completion_tokens=19),
        timings=Timings(queue_ms=30.0, prefill_ms=150.0, decode_ms=900.0),
        kv=KvTransfer(bytes_written=6144, write_ms=2.5, bytes_read=3072, read_ms=3.5, loaded_tokens=48),
        cost=COST)


def test_the_answers_speculation_counts_reach_its_final_event():
    from types import SimpleNamespace

    from bus.messages import Speculation
    from inference.vllm_engine import speculation_of
    # vLLM's per-request histogram: steps by accepted draft tokens (3 steps took none, 1 took one,
    # 2 took two), and the draft tokens proposed in all
    spec = speculation_of(SimpleNamespace(histogram=[3, 1, 2], num_draft_tokens=12))
    assert spec == Speculation(steps=6, drafted_tokens=12, accepted_tokens=5)
    assert speculation_of(None) is None  # speculation off
    event = final_event("r1", 9, "stop", 8, prompt=PromptStage.of(100, PREFILL), cost=COST,
                        decode=DecodeStage(decode_ms=1.0, loaded_tokens=0, speculation=spec))
    assert event.speculation == spec
