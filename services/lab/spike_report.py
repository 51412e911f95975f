"""What the spike bench prints: per priority and phase, what was offered, served, refused, degraded
and lost, with TTFT, and the verdict on the goal (interactive p99 TTFT during the spike within 2x of
its steady value, while batch absorbs the refusals)."""

from __future__ import annotations

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
