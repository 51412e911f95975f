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
