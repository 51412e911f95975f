"""The spike bench's schedule, tally and verdict, without a stack."""

from __future__ import annotations

import random

import pytest

from services.lab.spike_bench import parse_mix
from services.lab.spike_client import Arrival, Outcome, schedule
from services.lab.spike_report import goal, table

MIX = {"interactive": 0.2, "standard": 0.3, "batch": 0.5}


def test_the_schedule_is_poisson_per_phase_and_the_same_for_a_seed():
    arrivals = schedule(5.0, 10.0, 100.0, 100.0, MIX, ["q"], random.Random(3))
    assert arrivals == schedule(5.0, 10.0, 100.0, 100.0, MIX, ["q"], random.Random(3))
    counts = {ph: sum(a.phase == ph for a in arrivals) for ph in ("before", "during", "after")}
    assert 400 < counts["before"] < 600 and 4500 < counts["during"] < 5500 and 400 < counts["after"] < 600
    assert all(0 <= a.at < 100 for a in arrivals if a.phase == "before")
    assert all(100 <= a.at < 200 for a in arrivals if a.phase == "during")
    batch = sum(a.priority == "batch" for a in arrivals) / len(arrivals)
    assert batch == pytest.approx(0.5, abs=0.03)
    assert len({a.prompt for a in arrivals}) == len(arrivals)  # numbered: no two share a KV prefix


def test_the_mix_is_normalised_and_checked():
    assert parse_mix("interactive=1,batch=3") == {"interactive": 0.25, "batch": 0.75}
    with pytest.raises(SystemExit):
        parse_mix("urgent=1")


def outcome(priority: str, phase: str, status: str = "served", ttft: float | None = 0.5, **kw) -> Outcome:
    kw.setdefault("code", "" if status == "served" else "overloaded")
    return Outcome(Arrival(0.0, phase, priority, "q"), 32, status=status,
                   ttft_s=ttft if status == "served" else None, **kw)


def steady_and_spike(spike_ttft: float, refused: dict[str, int]) -> list[Outcome]:
    outs = [outcome(p, "before", ttft=0.5) for p in MIX for _ in range(10)]
    outs += [outcome("interactive", "during", ttft=spike_ttft) for _ in range(10)]
    outs += [outcome(p, "during", "refused", retry_after_s=3.0) for p, n in refused.items() for _ in range(n)]
    return outs


def test_the_goal_is_met_when_interactive_stays_fast_and_batch_takes_the_refusals():
    g = goal(table(steady_and_spike(0.9, {"standard": 2, "batch": 8})))
    assert g.met and g.ratio == pytest.approx(1.8) and "-> met" in g.text


def test_the_goal_is_missed_when_interactive_slows_or_is_refused_or_standard_takes_them():
    assert not goal(table(steady_and_spike(1.2, {"batch": 8}))).met  # 2.4x
    assert not goal(table(steady_and_spike(0.6, {"interactive": 3, "batch": 8}))).met
    assert not goal(table(steady_and_spike(0.6, {"standard": 8, "batch": 2}))).met


def test_cells_count_every_outcome_once_and_report_the_retry_after():
    outs = steady_and_spike(0.6, {"batch": 4}) + [outcome("batch", "after", "lost", code="timeout")]
    cells = table(outs)
    c = cells["batch"]["during"]
    assert (c.offered, c.served, c.refused, c.retry_after_p50_s) == (4, 0, 4, 3.0)
    assert cells["batch"]["all"].lost == 1 and cells["batch"]["all"].offered == 15


class FakeEdge:
    """Refuses the first `refusals` chats, then serves; stands in for a pool and its connections."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.ws = type("WS", (), {"close_code": None})()

    async def acquire(self):
        return self

    def release(self, _client) -> None:
        pass

    async def stream(self, messages, **params):
        if self.refusals:
            self.refusals -= 1
            yield {"type": "error", "code": "overloaded", "retryable": True, "retry_after_s": 0.01}
            return
        yield {"type": "accepted", "request_id": "r", "max_tokens": 16}
        yield {"type": "token", "seq": 0, "text": "x", "tokens": 1}
        yield {"type": "done", "finish_reason": "length", "usage": {"completion_tokens": 16}}


async def test_a_refusal_is_retried_only_when_asked_and_a_capped_answer_counts_as_degraded():
    from services.lab.spike_client import request

    once = Outcome(Arrival(0.0, "during", "batch", "q"), 128)
    await request(FakeEdge(1), once, retries=0)
    assert (once.status, once.code, once.retry_after_s, once.retries) == ("refused", "overloaded", 0.01, 0)

    retried = Outcome(Arrival(0.0, "during", "batch", "q"), 128)
    await request(FakeEdge(2), retried, retries=3)
    assert (retried.status, retried.retries, retried.degraded) == ("served", 2, True)
    assert retried.ttft_s is not None and retried.completion_tokens == 16


def test_admission_is_judged_by_the_waits_of_the_requests_served_near_each_refusal():
    from services.lab.spike_report import WaitSample, precision, wait_lines
    budget = {"interactive": 2.0, "standard": 8.0, "batch": 20.0}
    samples = [
        WaitSample(0.0, "interactive", False, 0.2, 0.3),
        WaitSample(1.0, "interactive", False, 1.8, 2.6),  # served, but waited over the budget
        WaitSample(1.5, "interactive", True, 2.4),  # refused then: right (a neighbour waited 2.6 s)
        WaitSample(2.5, "interactive", False, 1.0, 0.4),
        WaitSample(4.2, "interactive", True, 2.1),  # refused: its only neighbour waited 0.4 s
        WaitSample(9.0, "interactive", True, 2.2),  # nobody served near it: not judged
        WaitSample(1.5, "batch", False, 5.0, 25.0),  # another priority's wait says nothing of it
    ]
    p = precision(samples, "interactive", 2.0)
    assert (p.refused, p.judged, p.over_any, p.over_median) == (3, 2, 1, 0)
    assert precision(samples, "interactive", 2.0, near_s=0.4).judged == 0
    lines = wait_lines(samples, budget)
    row = next(line for line in lines if line.startswith("interactive"))
    # estimates of all six (p50 2.1, p95 2.4), measured of the three served (p50 0.4, p95 2.6)
    assert row.split() == ["interactive", "2", "6", "2.10", "2.40", "3", "0.40", "2.60", "3", "1/2", "0/2"]
    assert "1 of 2 judged refusals" in lines[-1] and "(50%)" in lines[-1] and "1 of 3 refusals had no" in lines[-1]


def test_the_spike_client_keeps_what_admission_said_and_what_the_request_then_waited():
    from services.lab.spike_client import _failed, _served, measured_wait_s, refusal_estimate
    from services.lab.spike_report import outcome_samples
    message = "the estimated queue wait for batch requests is 31.2 s, over its budget of 20 s; retry after 11.2 s"
    assert refusal_estimate(message) == ("batch", 31.2, 20.0)
    assert refusal_estimate("tenant 'acme' may use 600 tokens per minute") is None
    assert measured_wait_s({"queue_ms": 120.0, "prefill_ms": 5.0, "decode_queue_ms": 900.0}) == 0.9
    assert measured_wait_s({"queue_ms": 120.0}) == 0.12 and measured_wait_s(None) is None

    refused = outcome("batch", "during", status="lost", sent_at=101.0)
    _failed(refused, {"type": "error", "code": "overloaded", "message": message, "retry_after_s": 11.2}, False)
    limited = outcome("batch", "during", status="lost", sent_at=101.0)
    _failed(limited, {"type": "error", "code": "rate_limited", "message": "tenant", "retry_after_s": 3}, False)
    served = outcome("batch", "during", status="lost", sent_at=102.0)  # its answer carried no estimate
    _served(served, {"usage": {"completion_tokens": 32}, "finish_reason": "stop",
                     "timings": {"queue_ms": 2500.0, "decode_queue_ms": 1.0}})
    gauge = [(0.5, "batch", 3.0), (1.5, "batch", 12.0), (2.5, "batch", 40.0)]  # seconds since 100.0
    samples = outcome_samples([refused, limited, served], gauge, gauge_t0=100.0)
    assert [(s.refused, s.estimated_s, s.measured_s) for s in samples] == [(True, 31.2, None), (False, 12.0, 2.5)]


def test_audited_refusals_are_judged_by_their_own_waits():
    """An edge that audits (GROKSTACK_ADMISSION_AUDIT_SHARE) serves some requests estimated over
    the budget: their own measured waits are the refusals' precision, no neighbour needed."""
    from services.lab.spike_report import WaitSample, precision, wait_lines
    budget = {"interactive": 2.0, "standard": 8.0, "batch": 20.0}
    samples = [
        WaitSample(0.0, "interactive", False, 2.5, 3.1),  # audited: refusing it would have been right
        WaitSample(0.5, "interactive", False, 2.2, 1.2),  # audited: it would have been wrong
        WaitSample(1.0, "interactive", False, 1.9, 2.4),  # within the budget: not an audit
        WaitSample(2.0, "batch", False, 30.0, 25.0),  # audited, right
        WaitSample(3.0, "batch", True, 31.0),  # refused
    ]
    p = precision(samples, "interactive", 2.0)
    assert (p.audited, p.audited_over) == (2, 1)
    assert (precision(samples, "batch", 20.0).audited, precision(samples, "batch", 20.0).audited_over) == (1, 1)
    assert "2 of 3 waited over it (67%; interactive 1/2, batch 1/1)" in wait_lines(samples, budget)[-1]
    assert not any("audited" in line for line in wait_lines(samples[2:3], budget))
