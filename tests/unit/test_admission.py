"""Admission at the edge: wait estimates, refusals lowest priority first, degradation, tokens per
minute. Queue depths are set directly here; tests/pipeline/test_admission.py reads real ones."""

from __future__ import annotations

import pytest

from bus.messages import (ChatMessage, ChatRequest, FinalEvent, Heartbeat, SamplingSpec, Timings, TokenEvent,
                          Usage)
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


def measuring(worker: str, role: str, room: int, drain: float, **waits: float) -> Heartbeat:
    """The beat of a worker that measures its queue (inference/queue_meter.py)."""
    return Heartbeat(worker_id=worker, role=role, region="local", model_id="m", slots=4, rate_tokens_s=1.0,
                     room_jobs=room, drain_jobs_s=drain, queue_wait_s=waits)


def measured_watch() -> QueueWatch:
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    queues.on_beat(measuring("p1", "prefill", room=2, drain=4.0))
    queues.on_beat(measuring("d1", "decode", room=16, drain=2.0))
    return queues


def test_the_wait_is_the_jobs_ahead_beyond_the_free_room_over_the_measured_drain_rate():
    """Little's law on what the workers measured, one step at a time."""
    queues = measured_watch()
    for _ in range(10):  # published by this edge since the last read of the queues
        queues.published("local", "interactive", 100, 100)
    # 10 ahead and itself, 2 taken at once, 9 at 4 jobs/s; the decode pool (16 free) takes all at once
    assert queues.waits_s("local", "interactive") == (pytest.approx(2.25), 0.0)
    assert queues.wait_s("local", "interactive") == pytest.approx(2.25)
    for _ in range(4):
        queues.published("local", "standard", 100, 100)
    assert queues.wait_s("local", "standard") == pytest.approx((14 + 1 - 2) / 4)
    assert queues.wait_s("local", "interactive") == pytest.approx(2.25)  # standard is served after it

    # the next read: JetStream still holds 6 and 4, so the workers' room was taken then
    queues._published.clear()
    queues._pending[("req", "local", "interactive")] = 6
    queues._pending[("req", "local", "standard")] = 4
    assert queues.wait_s("local", "interactive") == pytest.approx(7 / 4)
    assert queues.wait_s("local", "standard") == pytest.approx(11 / 4)
    queues._pending[("req", "local", "batch")] = 2
    assert queues.wait_s("local", "batch") == pytest.approx(13 / 4)

    # a second prefill worker: twice the drain
    queues.on_beat(measuring("p2", "prefill", room=0, drain=4.0))
    assert queues.wait_s("local", "interactive") == pytest.approx(7 / 8)
    # a decode backlog: 20 jobs wait for a slot (so it has no room), and the 6 prefills ahead will
    # too: 27 with its own at 2 jobs/s is 13.5 s, less the 0.875 s it drains while the request
    # waits for its prefill
    queues._pending[("decode", "local", "interactive")] = 20
    first, decode = queues.waits_s("local", "interactive")
    assert (first, decode) == (pytest.approx(0.875), pytest.approx(13.5 - 0.875))
    assert queues.wait_s("local", "interactive") == pytest.approx(12.625)  # the longer one


def test_work_the_free_room_takes_at_once_does_not_wait():
    queues = measured_watch()
    queues.published("local", "interactive", 100, 100)
    assert queues.wait_s("local", "interactive") == 0.0  # one ahead, and itself: 2 free
    queues.published("local", "interactive", 100, 100)
    assert queues.wait_s("local", "interactive") == pytest.approx(1 / 4)  # the third waits for one to end
    queues.on_beat(measuring("p1", "prefill", room=0, drain=4.0))  # its batch filled since
    assert queues.wait_s("local", "interactive") == pytest.approx(3 / 4)
    queues.on_beat(measuring("p1", "prefill", room=2, drain=4.0))
    queues._published.clear()
    queues._pending[("req", "local", "batch")] = 3  # pending below it: interactive still has room
    assert queues.wait_s("local", "interactive") == 0.0
    queues._pending[("req", "local", "interactive")] = 1  # less than the room: on its way to it
    assert queues.wait_s("local", "interactive") == 0.0
    queues._pending[("req", "local", "interactive")] = 2  # as many as the room: both on their way
    assert queues.wait_s("local", "interactive") == pytest.approx(1 / 4)  # and it waits for one to end
    queues._pending[("req", "local", "interactive")] = 3  # more than the room: it was taken since the beat
    assert queues.wait_s("local", "interactive") == pytest.approx(4 / 4)


def test_answers_seen_ending_free_their_worker_s_room_before_its_next_beat():
    """A closed loop's next requests come as the answers before them end, before the workers'
    beats say their room is free again."""
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    queues.on_beat(measuring("p1", "prefill", room=4, drain=40.0))
    queues.on_beat(Heartbeat(worker_id="d1", role="decode", region="local", model_id="m", slots=16, active=12,
                             rate_tokens_s=1.0, room_jobs=4, drain_jobs_s=4.0))
    for _ in range(12):
        queues.published("local", "interactive", 100, 100)
    # decode: 12 ahead and itself, 4 free, 9 at 4 jobs/s = 2.25 s, less the prefill's (13 - 4) / 40
    assert queues.waits_s("local", "interactive") == (pytest.approx(0.225), pytest.approx(2.025))
    for _ in range(12):
        queues.job_ended("d1", "decode")
    assert queues.free_jobs("decode", "local") == 16
    assert queues.waits_s("local", "interactive") == (pytest.approx(0.225), 0.0)
    queues.job_ended("d1", "decode")  # no more than it held at its beat
    queues.job_ended("d1", "prefill")  # not a worker of that role
    queues.job_ended("d9", "decode")  # not one it heard
    assert queues.free_jobs("decode", "local") == 16 and queues.free_jobs("req", "local") == 4
    queues.on_beat(Heartbeat(worker_id="d1", role="decode", region="local", model_id="m", slots=16, active=16,
                             rate_tokens_s=1.0, room_jobs=0, drain_jobs_s=4.0))
    assert queues.free_jobs("decode", "local") == 0  # its next beat says what it holds now


def test_the_issue_s_load_is_not_over_budget():
    """16 chats at once (the issue's bench): the prefill pool (4 slots, 0.3 s a prompt at a full
    batch: 13 jobs/s) takes 4 at once and the 12 others within a second; the decode pool (16
    slots) has room for all of them. The old estimate added the decode pool's time to clear
    every answer (16 x 556 tokens at 16 x 556/3 s tokens/s: 3 s) and refused them."""
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    queues.on_beat(measuring("p1", "prefill", room=4, drain=4 / 0.3))
    queues.on_beat(measuring("d1", "decode", room=16, drain=16 / 3.0))
    admission = admission_of(queues)
    waits = [admission.admit(request("interactive"), PUBLIC).estimated_wait_s for _ in range(16)]
    assert waits[0] == 0.0 and max(waits) == pytest.approx((15 + 1 - 4) * 0.3 / 4, abs=0.01)
    assert max(waits) < SETTINGS.priorities.queue_budget_interactive_s


def test_a_pool_that_measured_nothing_yet_gives_no_estimate():
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    queues.on_beat(measuring("p1", "prefill", room=0, drain=0.0))  # no job ended yet
    queues._pending[("req", "local", "interactive")] = 1000
    assert queues.wait_s("local", "interactive") == 0.0


def test_a_dead_pool_is_weighed_at_the_drain_it_had_with_no_free_room():
    queues = measured_watch()
    queues.remember_speeds()  # as each read of the queues does
    queues.on_beat(Heartbeat(worker_id="p1", role="prefill", region="local", model_id="m", slots=4,
                             state="failed"))
    queues._pending[("req", "local", "interactive")] = 10
    assert queues.workers("local") == {"decode": 1}
    assert queues.wait_s("local", "interactive") == pytest.approx((10 + 1) / 4.0)


def test_the_measured_waits_are_kept_per_priority():
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    queues.on_beat(measuring("p1", "prefill", room=0, drain=1.0, interactive=0.2, batch=9.0))
    queues.on_beat(measuring("p2", "prefill", room=0, drain=1.0, interactive=0.5))
    assert queues.measured_wait_s("req", "local", "interactive") == 0.5
    assert queues.measured_wait_s("req", "local", "batch") == 9.0
    assert queues.measured_wait_s("req", "local", "standard") is None


def test_workers_that_do_not_measure_are_weighed_in_tokens_as_before():
    queues = watch(prefill_rate=100.0, decode_rate=1000.0)
    for _ in range(3):  # published by this edge: 100 prompt tokens, 100 max tokens each
        queues.published("local", "interactive", 100, 100)
    for _ in range(10):
        queues.published("local", "batch", 100, 100)
    # prefill: 3 prompts of 100 tokens at 100 tokens/s; decode: the same 3 will need 200 each at
    # 1000 tokens/s, done while they wait for prefill: only the first token's wait counts
    assert queues.wait_s("local", "interactive") == pytest.approx(3 * 100 / 100)
    assert queues.wait_s("local", "standard") == pytest.approx(3.0)  # nothing of its own queued
    assert queues.wait_s("local", "batch") == pytest.approx(13 * 100 / 100)
    queues.on_beat(beat("d1", "decode", 100.0))  # a slow decode pool: its queue is the longer wait
    queues._pending[("decode", "local", "interactive")] = 5  # jobs waiting for a decode slot
    assert queues.waits_s("local", "interactive") == (pytest.approx(3.0), pytest.approx((3 + 5) * 200 / 100 - 3))


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
    # measuring, it is one pool whose queue is the request queue: no decode queue of its own
    queues.on_beat(Heartbeat(worker_id="a1", role="aggregated", region="local", model_id="m", slots=4,
                             room_jobs=0, drain_jobs_s=2.0))
    assert queues.waits_s("local", "standard") == (pytest.approx((1 + 1) / 2.0), 0.0)


def test_batch_is_refused_first_then_standard_and_interactive_last():
    queues = watch(prefill_rate=100.0)
    admission = admission_of(queues, SETTINGS.priorities)
    queues._pending[("req", "local", "interactive")] = 1
    queues._pending[("req", "local", "standard")] = 5
    queues._pending[("req", "local", "batch")] = 20
    queues.costs.add("req", "interactive", 100)
    queues.costs.add("req", "standard", 100)
    queues.costs.add("req", "batch", 100)
    assert admission.admit(request("interactive"), PUBLIC).estimated_wait_s == 1.0  # under 2 s
    admission.admit(request("standard"), PUBLIC)  # 1 + 1 + 5 = 7 s, under 8 s
    with pytest.raises(Refused) as refused:
        admission.admit(request("batch"), PUBLIC)  # 2 + 6 + 20 = 28 s, over 20 s
    assert refused.value.code == "overloaded"
    assert refused.value.retry_after_s == 28 - 20
    assert "batch" in refused.value.message and "retry after" in refused.value.message
    assert "is 28.0 s, over its budget of 20 s" in refused.value.message


def test_a_refused_request_is_not_counted_as_queued():
    queues = watch(prefill_rate=100.0)
    admission = admission_of(queues, SETTINGS.priorities.replace(queue_budget_interactive_s=1))
    queues.costs.add("req", "interactive", 100)
    queues._pending[("req", "local", "interactive")] = 2
    for _ in range(3):
        with pytest.raises(Refused):
            admission.admit(request("interactive"), PUBLIC)
    assert queues.depth("req", "local", "interactive") == 2


def test_an_audited_refusal_is_served_and_its_real_wait_judges_the_refusal():
    from edge import metrics
    queues = watch(prefill_rate=100.0)
    edge = SETTINGS.edge.replace(admission_audit_share=0.5)
    admission = Admission(edge, SETTINGS.priorities, queues, Regions("local", "e1", edge, queues))
    queues.costs.add("req", "interactive", 100)
    queues._pending[("req", "local", "interactive")] = 4  # 5 s: over the 2 s budget
    audited, refused = [], 0
    for _ in range(400):
        try:
            audited.append(admission.admit(request("interactive"), PUBLIC))
        except Refused as exc:
            refused += exc.code == "overloaded"
        queues._pending[("req", "local", "interactive")] = 4  # what it published does not pile up
    assert 150 < len(audited) < 250 and refused == 400 - len(audited)  # half of them, drawn
    assert all(a.audited and a.estimated_wait_s > 2.0 for a in audited)
    counted = metrics.ADMISSION_AUDITS.labels("interactive", "over_budget")
    before_over, before_within = counted._value.get(), metrics.ADMISSION_AUDITS.labels(
        "interactive", "within_budget")._value.get()
    for wait_ms, done in zip((2500.0, 2100.0, 300.0), audited[:3], strict=True):  # two really waited over 2 s, one not
        final = FinalEvent(request_id="r1", seq=1, finish_reason="stop", timings=Timings(queue_ms=wait_ms),
                           usage=Usage(prompt_tokens=50, cached_prompt_tokens=0, completion_tokens=7))
        admission.finished("public", done, [final])
    assert counted._value.get() == before_over + 2
    assert metrics.ADMISSION_AUDITS.labels("interactive", "within_budget")._value.get() == before_within + 1
    assert not admission_of(watch()).admit(request("interactive"), PUBLIC).audited  # under budget: no audit
    with pytest.raises(Refused):  # a pool down and its replacement coming: refused, never audited
        for _ in range(50):
            queues._pending[("req", "local", "interactive")] = 4
            admission.admit(request("interactive"), PUBLIC, replacement_in_s=5.0)


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


def test_a_priority_s_queue_drains_at_what_its_workers_say_is_left_to_it():
    queues = QueueWatch(SETTINGS.bus, SETTINGS.edge, js=None)  # type: ignore[arg-type]
    queues.on_beat(Heartbeat(worker_id="p1", role="prefill", region="local", model_id="m", slots=4,
                             rate_tokens_s=1.0, room_jobs=0, drain_jobs_s=4.0,
                             drain_by_priority_s={"interactive": 4.0, "standard": 2.0, "batch": 0.2}))
    queues.on_beat(measuring("p2", "prefill", room=0, drain=4.0))  # an older worker: all of it to each
    queues._pending[("req", "local", "batch")] = 12
    assert queues.waits_s("local", "interactive")[0] == pytest.approx(1 / (4.0 + 4.0))  # first in line
    assert queues.waits_s("local", "batch")[0] == pytest.approx(13 / (0.2 + 4.0))
    queues._pending[("req", "local", "standard")] = 6
    assert queues.waits_s("local", "standard")[0] == pytest.approx(7 / (2.0 + 4.0))
