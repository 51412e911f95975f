"""Admission at the edge: wait estimates, refusals lowest priority first, degradation, tokens per
minute. Queue depths are set directly here; tests/pipeline/test_admission.py reads real ones."""

from __future__ import annotations

import pytest

from bus.messages import ChatMessage, ChatRequest, FinalEvent, Heartbeat, SamplingSpec, TokenEvent, Usage
from edge.admission import Admission, Refused, estimate_prompt_tokens, used_tokens
from edge.token_bucket import TokenBucket
from edge.regions import Regions
from edge.queues import QueueWatch
from edge.tenants import PUBLIC, Tenant
from services.settings import Settings

SETTINGS = Settings(queue_budget_interactive_s=2, queue_budget_standard_s=8, queue_budget_batch_s=20,
                    degraded_batch_max_tokens=64)


def beat(worker: str, role: str, rate: float) -> Heartbeat:
    return Heartbeat(worker_id=worker, role=role, region="local", model_id="m", slots=4, rate_tokens_s=rate)


def watch(prefill_rate: float = 100.0, decode_rate: float = 1000.0) -> QueueWatch:
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    queues.on_beat(beat("p1", "prefill", prefill_rate))
    queues.on_beat(beat("d1", "decode", decode_rate))
    return queues


def request(priority: str = "interactive", max_tokens: int = 100, content: str = "x" * 400) -> ChatRequest:
    return ChatRequest(request_id="r1", region="local", priority=priority,  # type: ignore[arg-type]
                       messages=[ChatMessage("user", content)], sampling=SamplingSpec(max_tokens=max_tokens),
                       reply_to="gs.evt.e.r1")


def admission_of(queues: QueueWatch, priorities=SETTINGS.priorities) -> Admission:
    return Admission(SETTINGS.edge, priorities, queues, Regions("local", "e1", SETTINGS.edge, queues))


def test_the_wait_counts_work_at_and_above_the_priority_in_tokens_over_the_pools_speed():
    queues = watch(prefill_rate=100.0, decode_rate=1000.0)
    for _ in range(3):  # published by this edge: 100 prompt tokens, 100 max tokens each
        queues.published("local", "interactive", 100, 100)
    for _ in range(10):
        queues.published("local", "batch", 100, 100)
    # prefill: 3 prompts of 100 tokens at 100 tokens/s; decode: the same 3 will need 200 each
    assert queues.wait_s("local", "interactive") == pytest.approx(3 * 100 / 100 + 3 * 200 / 1000)
    assert queues.wait_s("local", "standard") == pytest.approx(3.6)  # nothing of its own queued
    assert queues.wait_s("local", "batch") == pytest.approx(13 * 100 / 100 + 13 * 200 / 1000)
    queues._pending[("decode", "local", "interactive")] = 5  # jobs waiting for a decode slot
    assert queues.wait_s("local", "interactive") == pytest.approx(3.0 + (3 + 5) * 200 / 1000)


def test_no_speed_known_means_no_estimate_and_no_refusal():
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    queues.published("local", "batch", 100, 100)
    assert queues.wait_s("local", "batch") == 0.0


def test_an_aggregated_pool_is_costed_as_one_that_also_decodes():
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    queues.on_beat(beat("a1", "aggregated", 50.0))
    queues.published("local", "standard", 100, 100)
    assert queues.role_of("req", "local") == "aggregated"
    assert queues.wait_s("local", "standard") == pytest.approx(200 / 50)


def test_batch_is_refused_first_then_standard_and_interactive_last():
    queues = watch(prefill_rate=100.0)
    admission = admission_of(queues, SETTINGS.priorities)
    queues._pending[("req", "local", "interactive")] = 1
    queues._pending[("req", "local", "standard")] = 5
    queues._pending[("req", "local", "batch")] = 20
    queues.costs.add("req", "interactive", 100)
    queues.costs.add("req", "standard", 100)
    queues.costs.add("req", "batch", 100)
    admission.admit(request("interactive"), PUBLIC)  # 1 s + its own publish, under 2 s
    admission.admit(request("standard"), PUBLIC)  # 1 + 1 + 5 = 7 s, under 8 s
    with pytest.raises(Refused) as refused:
        admission.admit(request("batch"), PUBLIC)  # 2 + 6 + 20 = 28 s, over 20 s
    assert refused.value.code == "overloaded"
    assert 28 - 20 <= refused.value.retry_after_s <= 28 - 20 + 2  # + the decode work of those ahead
    assert "batch" in refused.value.message and "retry after" in refused.value.message


def test_a_refused_request_is_not_counted_as_queued():
    queues = watch(prefill_rate=100.0)
    admission = admission_of(queues, SETTINGS.priorities.replace(queue_budget_interactive_s=1))
    queues.costs.add("req", "interactive", 100)
    queues._pending[("req", "local", "interactive")] = 2
    for _ in range(3):
        with pytest.raises(Refused):
            admission.admit(request("interactive"), PUBLIC)
    assert queues.depth("req", "local", "interactive") == 2


def test_batch_is_degraded_before_it_is_refused():
    queues = watch(prefill_rate=100.0)
    admission = admission_of(queues, SETTINGS.priorities)
    queues.costs.add("req", "batch", 100)
    queues._pending[("req", "local", "batch")] = 12  # 12 s: past half the 20 s budget
    admitted = admission.admit(request("batch", max_tokens=256), PUBLIC)
    assert admitted.degraded_max_tokens == 64
    assert admitted.request.sampling.max_tokens == 64
    assert admitted.request.messages == request().messages
    queues._pending[("req", "local", "batch")] = 5
    assert admission.admit(request("batch", max_tokens=256), PUBLIC).degraded_max_tokens is None
    queues._pending[("req", "local", "standard")] = 6  # standard is never degraded
    assert admission.admit(request("standard", max_tokens=256), PUBLIC).degraded_max_tokens is None


def test_a_budget_of_zero_turns_admission_control_off():
    queues = watch(prefill_rate=1.0)
    admission = admission_of(queues, SETTINGS.priorities.replace(queue_budget_batch_s=0))
    queues.costs.add("req", "batch", 100)
    queues._pending[("req", "local", "batch")] = 1000
    admission.admit(request("batch"), PUBLIC)


def test_tenant_tokens_per_minute():
    queues = watch(prefill_rate=1e6)  # no queueing: only the tenant's limit can refuse
    admission = admission_of(queues, SETTINGS.priorities)
    tenant = Tenant(name="acme", tokens_per_minute=600)
    first = admission.admit(request(max_tokens=100, content="x" * 400), tenant)
    assert first.charged_tokens == estimate_prompt_tokens(request().messages) + 100  # 105 + 100
    admission.admit(request(max_tokens=100), tenant)
    with pytest.raises(Refused) as refused:
        for _ in range(2):
            admission.admit(request(max_tokens=100), tenant)
    assert refused.value.code == "rate_limited"
    assert 1 <= refused.value.retry_after_s <= 60
    admission.admit(request(max_tokens=100), PUBLIC)  # other tenants are not limited


def test_what_the_answer_did_not_use_goes_back_to_the_tenant():
    bucket = TokenBucket(rate=600 / 60, burst=600)
    assert bucket.take(400) == 0
    assert bucket.take(400) > 0  # 200 left
    bucket.give_back(300)  # the first answer used 100 of its 400
    assert bucket.take(400) == 0


def test_used_tokens_come_from_the_final_event_or_the_tokens_seen():
    final = FinalEvent(request_id="r1", seq=3, finish_reason="stop",
                       usage=Usage(prompt_tokens=50, cached_prompt_tokens=0, completion_tokens=7))
    token = TokenEvent(request_id="r1", seq=0, text="a", token_ids=[1, 2])
    assert used_tokens([token, final]) == 57
    assert used_tokens([token]) == 2
    assert used_tokens([]) == 0


def test_the_prompt_estimate_learns_the_real_token_counts():
    from edge.admission import PromptScale
    scale = PromptScale()
    assert scale.tokens(100) == 100
    scale.learn(14, 43)  # what a short chat prompt really is, with its template
    assert scale.tokens(100) == round(100 * 43 / 14)
    for _ in range(200):
        scale.learn(100, 200)
    assert scale.tokens(100) == pytest.approx(200, abs=2)
    scale.learn(0, 50)  # nothing to learn from
    assert scale.tokens(100) == pytest.approx(200, abs=2)
