"""The token budget, the served shares that order the queues, and the GPU clock: pure logic."""

from __future__ import annotations

import pytest

from bus.work_queue import ServedShares
from bus.roles import Role, job_cost
from inference.budget import TokenBudget, budget_for
from inference.cost_meter import GpuClock
from services.settings import Settings

CAPS = {"interactive": 1.0, "standard": 0.8, "batch": 0.5}


def test_a_worker_pulls_only_while_the_largest_job_still_fits():
    budget = TokenBudget(capacity=1000, slots=16, max_job=300)
    assert budget.room("interactive") == 3
    tickets = [budget.hold("interactive") for _ in range(3)]
    assert budget.room("interactive") == 0  # 900 held: a fourth job of 300 might not fit
    budget.settle(tickets[0], 50)  # the first one turned out small
    assert budget.reserved == 650 and budget.room("interactive") == 1
    for t in tickets:
        budget.release(t)
    assert budget.reserved == 0 and budget.jobs == 0


def test_real_costs_let_many_small_jobs_share_the_budget_up_to_the_slots():
    budget = TokenBudget(capacity=10_000, slots=4, max_job=2000)
    for _ in range(4):
        budget.settle(budget.hold("interactive"), 100)
    assert budget.reserved == 400
    assert budget.room("interactive") == 0  # tokens left, but every slot is taken


def test_lower_priorities_leave_room_for_interactive_work():
    budget = TokenBudget(capacity=1000, slots=10, max_job=100, caps=CAPS)
    batch = [budget.hold("batch") for _ in range(budget.room("batch"))]
    assert len(batch) == 5  # batch may hold half
    assert budget.room("batch") == 0
    assert budget.room("standard") == 3  # standard and batch together at most 80 %
    standard = [budget.hold("standard") for _ in range(3)]
    assert budget.room("standard") == 0 and budget.room("batch") == 0
    assert budget.room("interactive") == 2  # the rest is interactive's
    for t in batch + standard:
        budget.release(t)
    assert budget.room("batch") == 5


def test_releasing_twice_or_settling_after_release_changes_nothing():
    budget = TokenBudget(capacity=100, slots=2, max_job=50)
    ticket = budget.hold("standard")
    budget.release(ticket)
    budget.release(ticket)
    budget.settle(ticket, 10)
    assert budget.reserved == 0 and budget.jobs == 0


def test_a_job_never_holds_more_than_the_largest_job_or_the_whole_budget():
    budget = TokenBudget(capacity=100, slots=2, max_job=4096)
    assert budget.max_job == 100
    ticket = budget.hold("interactive")
    budget.settle(ticket, 10_000)
    assert budget.reserved == 100


def test_job_costs_and_budgets_per_role():
    assert job_cost("prefill", 500, 64) == 500
    assert job_cost("decode", 500, 64) == 564
    assert job_cost("aggregated", 500, 64) == 564
    settings = Settings(prefill_token_budget=8192, decode_token_budget=0)
    worker, priorities = settings.worker, settings.priorities
    assert budget_for(worker, priorities, Role.PREFILL, 4, 2048, 23_000).capacity == 8192
    assert budget_for(worker, priorities, Role.DECODE, 16, 2048, 23_000).capacity == 23_000  # the engine's KV cache
    assert budget_for(worker, priorities, Role.AGGREGATED, 16, 2048, 23_000).capacity == 23_000
    assert budget_for(worker.replace(decode_token_budget=5000), priorities, Role.DECODE, 16, 2048,
                      23_000).capacity == 5000
    # the caps come from the priority table
    assert budget_for(worker, priorities.replace(max_share_batch=0.3), Role.DECODE, 16, 2048,
                      23_000).caps == {"interactive": 1.0, "standard": 0.8, "batch": 0.3}


def test_strict_priority_order_while_every_priority_has_its_share():
    shares = ServedShares({"standard": 0.1, "batch": 0.05})
    for p, tokens in (("interactive", 70), ("standard", 20), ("batch", 10)):
        shares.served(p, tokens, now=0.0)
    assert shares.order() == ["interactive", "standard", "batch"]


def test_a_starved_priority_is_asked_first():
    shares = ServedShares({"standard": 0.1, "batch": 0.05})
    shares.served("interactive", 1000, now=0.0)
    shares.served("standard", 200, now=0.0)
    assert shares.order()[0] == "batch"  # 0 % of what was served, below its 5 %
    shares.served("batch", 100, now=0.0)
    assert shares.order() == ["interactive", "standard", "batch"]


def test_shares_forget_old_work():
    shares = ServedShares({"batch": 0.05}, half_life_s=10.0)
    shares.served("batch", 1000, now=0.0)
    shares.served("interactive", 1000, now=100.0)  # 2^-10 of the batch work is left
    assert shares.share("batch") < 0.01


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_engine_time_is_split_among_the_jobs_running_together():
    t = FakeClock()
    clock = GpuClock(usd_per_gpu_s=3.0 / 3600, clock=t)
    clock.start("a")
    t.now = 1.0  # a alone for 1 s
    clock.start("b")
    t.now = 3.0  # a and b together for 2 s
    assert clock.stop("a") == 2.0
    t.now = 4.0  # b alone for 1 s
    assert clock.stop("b") == 2.0
    assert clock.busy_s == 4.0 and clock.job_s == 6.0  # 1 x 1 s + 2 x 2 s + 1 x 1 s
    t.now = 10.0  # idle time is nobody's
    clock.start("c")
    assert clock.stop("c") == 0.0 and clock.busy_s == 4.0


def test_a_long_prompt_pays_more_of_a_prefill_batch():
    t = FakeClock()
    clock = GpuClock(usd_per_gpu_s=1.0, clock=t)
    clock.start("long", weight=900)
    clock.start("short", weight=100)
    t.now = 1.0
    assert round(clock.stop("long"), 6) == 0.9
    assert round(clock.stop("short"), 6) == 0.1


def test_cost_is_priced_per_pool():
    clock = GpuClock.of(Settings(gpu_price_per_hour=3.6, gpus_per_worker=2).worker)
    cost = clock.price(prefill_gpu_s=1.0, decode_gpu_s=10.0)
    assert cost.usd == round(11.0 * 0.002, 9)
    cost = clock.price(prefill_gpu_s=1.0, decode_gpu_s=10.0, prefill_usd=0.5)  # the prefill pool's own price
    assert cost.usd == round(0.5 + 10.0 * 0.002, 9)


def run_jobs(meter, at_once: int, seconds: float, start: float) -> float:
    """`at_once` jobs go into the engine together and all take `seconds`: when they ended."""
    handles = [meter.started(now=start) for _ in range(at_once)]
    for handle in handles:
        meter.ended(handle, served=True, now=start + seconds)
    return start + seconds


def test_the_queue_meter_reports_the_drain_and_the_waits_its_jobs_had():
    from inference.queue_meter import QueueMeter
    meter = QueueMeter(window_s=10.0)
    start = meter._since
    assert meter.drain_jobs_s(4, now=start + 1) == 0.0  # no job ended yet: no rate, no estimate
    for n in range(4):
        meter.taken("interactive", 0.1 * n, now=start + n * 0.1)
    meter.taken("batch", 3.0, now=start + 0.5)
    run_jobs(meter, 4, 2.0, start)  # 4 at once, each taking 2 s at this batch size
    assert meter.service_s(4) == pytest.approx(2.0)
    # Little's law: 4 held at once over 2 s each; it finished 4 in its first 2.5 s (1.6/s)
    assert meter.drain_jobs_s(4, now=start + 2.5) == pytest.approx(2.0)
    # when it would hold fewer at once, what it finished lately is the more
    assert meter.drain_jobs_s(1, now=start + 2.5) == pytest.approx(1.6)
    assert meter.waits_s(now=start + 2.5) == {"interactive": pytest.approx(0.15), "batch": 3.0}
    assert meter.drain_jobs_s(4, now=start + 13.5) == pytest.approx(2.0)  # idle since: the speed it had
    assert meter.waits_s(now=start + 13.5) == {}  # none taken within the window
    handle = meter.started(now=start + 14)  # a job that failed says nothing of the speed
    meter.ended(handle, served=False, now=start + 30)
    assert meter.service_s(4) == pytest.approx(2.0)


def test_the_time_a_job_takes_is_fitted_to_the_batch_it_ran_in():
    """A shared engine (a CPU's, or any prompt pass) gets through as many jobs a second at any
    batch size: fitted from jobs alone and jobs four at once, it is not taken for one whose jobs
    take as long at 4 as alone (which gave 4x the drain at a spike's onset)."""
    from inference.queue_meter import Ended, QueueMeter
    shared, flat = QueueMeter(), QueueMeter()
    t = shared._since
    for at_once in (1, 1, 2, 4, 4):
        run_jobs(shared, at_once, 0.1 * at_once, t)
        t = run_jobs(flat, at_once, 0.5, t)
    assert shared.service_s(4) == pytest.approx(0.4)
    assert shared.drain_jobs_s(4, now=t) == pytest.approx(10.0)
    assert shared.drain_jobs_s(2, now=t) == pytest.approx(10.0)
    assert flat.service_s(4) == pytest.approx(0.5)
    assert flat.drain_jobs_s(4, now=t) == pytest.approx(8.0)
    # a fixed part and a shared part: 0.2 s + 0.1 s a job held
    mixed = QueueMeter()
    for at_once in (1, 3, 5):
        t = run_jobs(mixed, at_once, 0.2 + 0.1 * at_once, t)
    assert mixed.service_s(4) == pytest.approx(0.6)
    # jobs all alone tell nothing of the slope: their time is taken as flat
    alone = QueueMeter()
    run_jobs(alone, 8, 0.1, alone._since)  # (8 at once, as alike)
    assert alone.service_s(1) == pytest.approx(0.1)
    # all of it shared, with a little noise: a line through the mean from none
    shared = QueueMeter()
    t = shared._since
    for at_once, seconds in ((1, 0.12), (2, 0.19), (4, 0.42), (4, 0.38), (8, 0.79)):
        t = run_jobs(shared, at_once, seconds, t)
    assert shared.service_s(4) == pytest.approx(0.4, rel=0.05)
    steeper = QueueMeter()  # a line that would start below 0: through the mean from none instead
    steeper._ended.extend(Ended(held, seconds) for held, seconds in ((1, 0.1), (2, 0.3), (4, 0.7)) * 2)
    assert steeper.service_s(4) == pytest.approx(4 * (1.1 / 3) / (7 / 3))


def test_a_slope_the_jobs_do_not_show_is_not_fitted():
    """Answers of different lengths at different batch sizes make a slope out of noise; a line
    through it would call a flat decode pool slow at a batch it never ran."""
    from inference.queue_meter import Ended, QueueMeter
    noisy = QueueMeter()  # one job at a time of each (jobs ending together would weigh as many)
    noisy._ended.extend(Ended(held, seconds) for held, seconds in
                        ((1, 4.0), (3, 5.5), (1, 5.0), (3, 6.0), (1, 3.0), (3, 4.5)))
    assert noisy.service_s(16) == pytest.approx(28 / 6)  # flat: the line's slope is 1.8 errors from none
    noisy._ended.extend(Ended(held, seconds) for held, seconds in ((1, 4.0), (3, 5.5), (1, 4.1), (3, 5.4)))
    assert noisy.service_s(16) > 10  # the same slope, steadier: now it shows
    falling = QueueMeter()  # longer alone than together (other work ran then): flat, never below 0
    t = falling._since
    for at_once, seconds in ((1, 2.0), (1, 2.2), (4, 1.0), (4, 1.1)):
        t = run_jobs(falling, at_once, seconds, t)
    assert falling.service_s(16) == pytest.approx((2.0 + 2.2 + 4 * 1.0 + 4 * 1.1) / 10)
    few = QueueMeter()  # one alone and two together: too few to fit
    t = run_jobs(few, 1, 0.1, few._since)
    run_jobs(few, 2, 0.2, t)
    assert few.service_s(4) == pytest.approx(0.5 / 3)


def test_the_jobs_held_are_averaged_over_each_job_s_time():
    from inference.queue_meter import QueueMeter
    meter = QueueMeter()
    t = meter._since
    a = meter.started(now=t)
    b = meter.started(now=t + 1)  # A alone for 1 s, then both for 1 s
    meter.ended(a, served=True, now=t + 2)
    meter.ended(b, served=True, now=t + 2)
    assert [(e.held, e.seconds) for e in meter._ended] == [(1.5, 2.0), (2.0, 1.0)]


def test_each_priority_drains_what_the_priorities_above_it_leave_of_the_rate():
    """Work above a waiting request keeps arriving after it and is served first: its queue drains
    at what is left, never below its minimum share."""
    from inference.queue_meter import QueueMeter
    meter = QueueMeter(window_s=10.0)
    start = meter._since
    run_jobs(meter, 1, 1.0, start)  # 1 s a job, flat: 4 at once, 4 jobs/s
    start += 1
    for n in range(20):  # in the last 10 s: 20 interactive (2/s) and 10 standard (1/s) taken
        meter.taken("interactive", 0.0, now=start + n * 0.5)
    for n in range(10):
        meter.taken("standard", 0.0, now=start + n)
    shares = {"interactive": 0.0, "standard": 0.1, "batch": 0.05}
    drains = meter.drain_by_priority_s(meter.drain_jobs_s(4, now=start + 10), shares, now=start + 10)
    assert drains == {"interactive": 4.0, "standard": 2.0, "batch": 1.0}
    for n in range(20):  # more interactive than it drains: standard and batch keep their shares
        meter.taken("interactive", 0.0, now=start + 10 + n * 0.1)
    drains = meter.drain_by_priority_s(meter.drain_jobs_s(4, now=start + 12), shares, now=start + 12)
    assert drains == {"interactive": 4.0, "standard": pytest.approx(0.4), "batch": pytest.approx(0.2)}
