"""What the spike bench prints: per priority and phase, what was offered, served, refused, degraded
and lost, with TTFT, and the verdict on the goal (interactive p99 TTFT during the spike within 2x of
its steady value, while batch absorbs the refusals).

Also what this and `grokstack bench --target` print of admission itself (`wait_lines`): per
priority, the queue wait the edge estimated for each request against the wait it then had, and
the refusals' precision: of the refused requests, the share refused when requests of their
priority accepted around the same moment (within NEAR_S) really waited over its budget; and, when
the edge audits (GROKSTACK_ADMISSION_AUDIT_SHARE), the share of the requests it served although
their estimate was over the budget that then waited over it: the precision measured directly.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass

from bus.priorities import PRIORITIES
from services.lab.common import quantile
from services.lab.spike_client import PHASES, Outcome

GOAL_RATIO = 2.0
FEW = 5  # a p99 from fewer served requests than this is only their maximum


@dataclass
class Cell:
    offered: int = 0
    served: int = 0
    refused: int = 0
    retry_after_p50_s: float | None = None
    degraded: int = 0
    lost: int = 0
    retried: int = 0  # requests refused at least once and sent again (--retry)
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None


def cell(outcomes: list[Outcome]) -> Cell:
    ttfts = [o.ttft_s for o in outcomes if o.status == "served" and o.ttft_s is not None]
    waits = [o.retry_after_s for o in outcomes if o.status == "refused" and o.retry_after_s is not None]
    return Cell(offered=len(outcomes), served=sum(o.status == "served" for o in outcomes),
                refused=sum(o.status == "refused" for o in outcomes),
                retry_after_p50_s=quantile(waits, 0.5) if waits else None,
                degraded=sum(o.degraded for o in outcomes), lost=sum(o.status == "lost" for o in outcomes),
                retried=sum(o.retries > 0 for o in outcomes),
                ttft_p50_s=quantile(ttfts, 0.5) if ttfts else None,
                ttft_p99_s=quantile(ttfts, 0.99) if ttfts else None)


def table(outcomes: list[Outcome]) -> dict[str, dict[str, Cell]]:
    """priority -> phase -> Cell, with an "all" phase per priority."""
    out: dict[str, dict[str, Cell]] = {}
    for p in PRIORITIES:
        mine = [o for o in outcomes if o.arrival.priority == p]
        out[p] = {ph: cell([o for o in mine if o.arrival.phase == ph]) for ph in PHASES}
        out[p]["all"] = cell(mine)
    return out


@dataclass
class Goal:
    met: bool
    steady_p99_s: float | None
    spike_p99_s: float | None
    ratio: float | None
    refused_during: dict[str, int]
    latency_met: bool
    absorbed: bool
    text: str


def goal(cells: dict[str, dict[str, Cell]]) -> Goal:
    steady, spike = cells["interactive"]["before"].ttft_p99_s, cells["interactive"]["during"].ttft_p99_s
    ratio = spike / steady if steady and spike is not None else None
    latency_met = ratio is not None and ratio <= GOAL_RATIO
    refused = {p: cells[p]["during"].refused for p in PRIORITIES}
    total = sum(refused.values())
    # Batch absorbs the refusals: interactive is (almost) never refused, and batch takes the
    # largest part of what is; with no refusals at all there is nothing to absorb.
    absorbed = refused["interactive"] <= 0.01 * cells["interactive"]["during"].offered and (
        total == 0 or refused["batch"] >= max(refused["standard"], total / 2))
    few = min(cells["interactive"]["before"].served, cells["interactive"]["during"].served) < FEW
    text = (f"goal: interactive p99 TTFT during the spike within {GOAL_RATIO:g}x of steady, batch absorbing the "
            f"refusals: p99 {_s(steady)} before, {_s(spike)} during ({_x(ratio)})"
            f"{' (few samples: p99 = max)' if few else ''}; refused during the spike: "
            + ", ".join(f"{p} {n}" for p, n in refused.items())
            + f" -> {'met' if latency_met and absorbed else 'MISSED'}")
    return Goal(latency_met and absorbed, steady, spike, ratio, refused, latency_met, absorbed, text)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _x(v: float | None) -> str:
    return "no ratio" if v is None else f"{v:.2f}x"


def render(cells: dict[str, dict[str, Cell]], outcomes: list[Outcome], retries: bool) -> list[str]:
    head = (f"{'priority':<12}{'phase':<8}{'offered':>8}{'served':>8}{'refused':>8}{'retry-after':>12}"
            f"{'degraded':>9}{'lost':>6}{'TTFT p50':>10}{'TTFT p99':>10}" + (f"{'retried':>9}" if retries else ""))
    lines = [head]
    for p in PRIORITIES:
        for ph in (*PHASES, "all"):
            c = cells[p][ph]
            lines.append(f"{p if ph == 'before' else '':<12}{ph:<8}{c.offered:>8}{c.served:>8}{c.refused:>8}"
                         f"{_s(c.retry_after_p50_s):>12}{c.degraded:>9}{c.lost:>6}{_s(c.ttft_p50_s):>10}"
                         f"{_s(c.ttft_p99_s):>10}" + (f"{c.retried:>9}" if retries else ""))
    codes = Counter(o.code for o in outcomes if o.status == "refused")
    lost = Counter(o.code for o in outcomes if o.status == "lost")
    lines.append("(retry-after: p50 of the refusals' retry_after_s; TTFT from sending the chat frame to the "
                 "first token frame, served requests only; phases by arrival time)")
    lines.append("refusals by code: " + (", ".join(f"{c} {n}" for c, n in codes.most_common()) or "none"))
    lines.append("lost: " + (", ".join(f"{c} {n}" for c, n in lost.most_common()) or "none"))
    return lines


def as_json(cells: dict[str, dict[str, Cell]], g: Goal) -> dict:
    return {"cells": {p: {ph: asdict(c) for ph, c in row.items()} for p, row in cells.items()},
            "goal": asdict(g), "lost": sum(row["all"].lost for row in cells.values())}


# --- admission: estimated against measured queue wait, and the refusals' precision ---

NEAR_S = 2.0  # a refusal is judged by the requests of its priority accepted this close to it
GAUGE_WITHIN_S = 1.0  # the edge's gauge is read once a second: a reading this close stands for a request's estimate


@dataclass(frozen=True)
class WaitSample:
    """One request as admission saw it: when it was sent (any clock, the same for all), whether it
    was refused as overloaded, the wait the edge estimated (its answer's estimate, a refusal's
    message, or the edge's gauge then) and the wait it had (a served request's final timings)."""
    at: float
    priority: str
    refused: bool
    estimated_s: float | None = None
    measured_s: float | None = None


def gauge_at(samples: list[tuple[float, str, float]], at: float, priority: str,
             within_s: float = GAUGE_WITHIN_S) -> float | None:
    """The edge's estimate gauge (services/lab/spike_watch.py EdgeWaits samples: seconds, priority,
    value) read nearest to `at`, if within `within_s` of it."""
    near = [(abs(t - at), v) for t, p, v in samples if p == priority and abs(t - at) <= within_s]
    return min(near)[1] if near else None


@dataclass
class Precision:
    refused: int = 0
    judged: int = 0  # refusals with requests of their priority accepted near them
    over_any: int = 0  # ... of which one of those waited over the budget
    over_median: int = 0  # ... of which their median wait was over it
    audited: int = 0  # served although estimated over the budget (GROKSTACK_ADMISSION_AUDIT_SHARE)
    audited_over: int = 0  # ... of which the wait was over it: the refusal would have been right


def precision(samples: list[WaitSample], priority: str, budget: float, near_s: float = NEAR_S) -> Precision:
    out = Precision()
    served = [s for s in samples if s.priority == priority and not s.refused and s.measured_s is not None]
    audited = [s for s in served if s.estimated_s is not None and s.estimated_s > budget > 0]
    out.audited, out.audited_over = len(audited), sum(1 for s in audited if s.measured_s > budget)  # type: ignore[operator]
    for r in (s for s in samples if s.priority == priority and s.refused):
        out.refused += 1
        near = [s.measured_s for s in served if abs(s.at - r.at) <= near_s]
        if near:
            out.judged += 1
            out.over_any += max(near) > budget  # type: ignore[operator]
            out.over_median += statistics.median(near) > budget  # type: ignore[arg-type, operator]
    return out


def outcome_samples(outcomes: list[Outcome], gauge: list[tuple[float, str, float]] | None = None,
                    gauge_t0: float = 0.0) -> list[WaitSample]:
    """The spike bench's outcomes as admission saw them. A request whose answer did not carry the
    edge's estimate gets the edge's gauge as last read before it was sent (`gauge`: seconds
    since `gauge_t0` on the monotonic clock), when it was read."""
    out = []
    for o in outcomes:
        if o.sent_at is None or (o.status == "refused" and o.code != "overloaded"):
            continue
        estimate = o.estimated_wait_s
        if estimate is None and gauge:
            estimate = gauge_at(gauge, o.sent_at - gauge_t0, o.arrival.priority)
        out.append(WaitSample(o.sent_at, o.arrival.priority, o.status == "refused", estimate, o.measured_wait_s))
    return out


def _q(values: list[float], q: float) -> str:
    return "-" if not values else f"{quantile(values, q):.2f}"


def wait_lines(samples: list[WaitSample], budgets: dict[str, float], near_s: float = NEAR_S) -> list[str]:
    """Per priority: the estimated queue wait (accepted and refused requests) against the measured
    one (served requests), medians and p95 in seconds, and the refusals' precision."""
    lines = [f"\nadmission: estimated vs measured queue wait (s; measured = the longer of a served request's "
             f"prefill and decode queue waits), refusals judged by the requests served within {near_s:g} s",
             f"{'priority':<12}{'budget':>7}{'est n':>7}{'est p50':>9}{'est p95':>9}{'meas n':>8}{'meas p50':>10}"
             f"{'meas p95':>10}{'refused':>9}{'precision':>11}{'(median)':>10}"]
    for priority in PRIORITIES:
        mine = [s for s in samples if s.priority == priority]
        if not mine:
            continue
        budget = budgets.get(priority, 0.0)
        est = [s.estimated_s for s in mine if s.estimated_s is not None]
        meas = [s.measured_s for s in mine if s.measured_s is not None]
        p = precision(samples, priority, budget, near_s)
        share = f"{p.over_any}/{p.judged}" if p.judged else "-"
        median = f"{p.over_median}/{p.judged}" if p.judged else "-"
        lines.append(f"{priority:<12}{budget:>7g}{len(est):>7}{_q(est, 0.5):>9}{_q(est, 0.95):>9}{len(meas):>8}"
                     f"{_q(meas, 0.5):>10}{_q(meas, 0.95):>10}{p.refused:>9}{share:>11}{median:>10}")
    total = [precision(samples, p, budgets.get(p, 0.0), near_s) for p in PRIORITIES]
    refused, judged, over = sum(t.refused for t in total), sum(t.judged for t in total), sum(t.over_any for t in total)
    lines.append(f"refusal precision: {over} of {judged} judged refusals had a request of their priority served "
                 f"within {near_s:g} s that waited over the budget ({over / judged:.0%}); " if judged else
                 "refusal precision: no refusal could be judged; ")
    lines[-1] += f"{refused - judged} of {refused} refusals had no served request near them to judge by"
    audited, right = sum(t.audited for t in total), sum(t.audited_over for t in total)
    if audited:
        by = ", ".join(f"{p} {t.audited_over}/{t.audited}" for p, t in zip(PRIORITIES, total, strict=True) if t.audited)
        lines.append(f"audited refusals (served although estimated over the budget): {right} of {audited} waited "
                     f"over it ({right / audited:.0%}; {by})")
    return lines
