"""Every region as this edge knows it, from the region beats (`gs.region.<region>`).

Each edge announces, every `region_beat_s`, each region whose workers it hears: live workers by
role, free slots, the estimated queue wait per priority (edge/queues.py), the recent prefill time,
whether it drains, its model and JetStream domain. Worker heartbeats stay in their region (the
leaf connection to the transit does not carry them, services/nats_config.py); region beats go
everywhere, so every edge of every region hears every region, its own included.

A region is dead when no beat of it came for `region_timeout_s`, or when its beats have said for
`region_timeout_s` that a stage has no live worker. The round trip to a region is measured
without comparing clocks: each beat hands back the last beat it heard from every edge (`Echo`:
when that was sent, by its sender's clock, and how long it was held), so the sender takes the
time since it sent it, less the holding.

For the regions this edge hears the workers of (its own), the queue wait comes from its own
QueueWatch, which also counts what it published since the last poll; for the others, from their
beats.

Only the bus makes a region known here, never a client: a region a client names that is not
known (its own, one heard beating, or one whose workers it hears) is refused by the intake before
anything is kept for it. Even the bus is not trusted to be small: at most MAX_REGIONS regions are
kept; a new one takes the place of the one silent longest if that one is dead, else it is ignored;
a region silent for REGION_MEMORY_S is forgotten (long after any request it held timed out).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from bus.messages import Echo, RegionBeat
import structlog

from bus.priorities import PRIORITIES, Priority
from bus.roles import STAGES, Stage, roles_serving
from edge import metrics
from edge.config import EdgeConfig
from edge.queues import FULL_WARNING_S, MAX_REGIONS, QueueWatch

log = structlog.get_logger("grokstack.edge")

RTT_SMOOTHING = 0.3  # weight of a new round-trip sample
ECHOES = 1024  # beats handed back at most (one per edge heard lately)
REGION_MEMORY_S = 3600.0  # a region silent this long is forgotten: "recently dead" no more


@dataclass
class RegionSeen:
    beat: RegionBeat
    heard_at: float  # monotonic


class Regions:
    def __init__(self, home: str, edge_id: str, config: EdgeConfig, queues: QueueWatch) -> None:
        self.home = home
        self.edge_id = edge_id
        self.config = config
        self.queues = queues
        self._seen: dict[str, RegionSeen] = {}
        self._rtt: dict[str, float] = {}
        self._heard: OrderedDict[str, tuple[float, float]] = OrderedDict()  # edge -> (its sent_at, heard at)
        self._prefill: dict[str, float] = {}  # region -> smoothed seconds of a prefill there
        # region -> stage -> when a beat last said a worker serving it was alive there (monotonic)
        self._stage_alive_at: dict[str, dict[Stage, float]] = {}
        self._warned_full = -FULL_WARNING_S

    # ------------------------------------------------------------------ inputs

    def on_beat(self, beat: RegionBeat) -> None:
        now = time.monotonic()
        seen = self._seen.get(beat.region)
        if seen is None and not self._room_for(beat.region, now):
            return
        if seen is None or beat.sent_at >= seen.beat.sent_at or now - seen.heard_at > self.config.region_beat_s:
            self._seen[beat.region] = RegionSeen(beat, now)
            stages = self._stage_alive_at.setdefault(beat.region, {})
            for stage in STAGES:
                if any(beat.workers.get(role, 0) > 0 for role in roles_serving(stage)):
                    stages[stage] = now
        self._heard[beat.edge_id] = (beat.sent_at, now)
        self._heard.move_to_end(beat.edge_id)
        while len(self._heard) > ECHOES:
            self._heard.popitem(last=False)
        echo = beat.echoes.get(self.edge_id)
        if echo is not None and beat.edge_id != self.edge_id:
            sample = max(0.0, time.time() - echo.sent_at - echo.held_s)
            old = self._rtt.get(beat.region)
            self._rtt[beat.region] = sample if old is None else old + RTT_SMOOTHING * (sample - old)

    def _room_for(self, region: str, now: float) -> bool:
        """Whether a region not known yet may be: forgets the long-silent, then makes room by
        forgetting the region silent longest if it is dead (never the edge's own)."""
        self._forget_silent(now)
        if len(self._seen) < MAX_REGIONS:
            return True
        oldest = min((r for r in self._seen if r != self.home), key=lambda r: self._seen[r].heard_at, default=None)
        if oldest is not None and now - self._seen[oldest].heard_at > self.config.region_timeout_s:
            self._forget(oldest)
            return True
        if now - self._warned_full >= FULL_WARNING_S:
            self._warned_full = now
            log.warning("beat of a new region ignored: as many regions alive as an edge keeps",
                        region=region, regions=len(self._seen))
        return False

    def _forget_silent(self, now: float) -> None:
        for region in [r for r, seen in self._seen.items() if now - seen.heard_at > REGION_MEMORY_S]:
            self._forget(region)

    def _forget(self, region: str) -> None:
        for table in (self._seen, self._rtt, self._prefill, self._stage_alive_at):
            table.pop(region, None)
        forget_region_metrics(region)

    def observe_prefill(self, region: str, seconds: float) -> None:
        """A request of this edge was prefilled in `region` in `seconds` (its final event's timings)."""
        if not self.knows(region):
            return
        old = self._prefill.get(region)
        self._prefill[region] = seconds if old is None else old + RTT_SMOOTHING * (seconds - old)

    # ------------------------------------------------------------------ what this edge says

    def beats(self, model_ids: list[str], domain: str) -> list[RegionBeat]:
        """This edge's beats: one for each region whose workers it hears, and its own always.
        Called every beat period, it forgets the regions long silent too."""
        now, wall = time.monotonic(), time.time()
        self._forget_silent(now)
        echoes = {edge: Echo(sent_at, round(now - heard, 6)) for edge, (sent_at, heard) in self._heard.items()
                  if now - heard <= self.config.region_timeout_s}
        out = []
        for region in sorted(self.queues.regions_seen() | {self.home}):
            out.append(RegionBeat(
                region=region, edge_id=self.edge_id, sent_at=wall, domain=domain, model_ids=model_ids,
                workers=self.queues.workers(region), free_slots=self.queues.free_slots(region),
                queue_wait_s={p: round(self.queues.wait_s(region, p), 4) for p in PRIORITIES},
                prefill_s=round(self._prefill.get(region, 0.0), 4),
                draining=self.config.region_draining and region == self.home, echoes=echoes))
        return out

    # ------------------------------------------------------------------ what this edge knows

    def known(self) -> list[str]:
        return sorted(self._seen)

    def knows(self, region: str) -> bool:
        """A region a request may name: this edge's own, one heard beating (alive or recently
        dead), or one whose workers it hears."""
        return region == self.home or region in self._seen or region in self.queues.regions_heard()

    def names(self) -> list[str]:
        """Every region a request may name."""
        return sorted({self.home, *self._seen, *self.queues.regions_heard()})

    def stage_gone_s(self, region: str, stage: Stage) -> float | None:
        """Seconds since a worker serving `stage` was last heard alive in `region` (under a beat
        period while one is), or None when this edge never knew one there (or forgot it)."""
        now = time.monotonic()
        roles = roles_serving(stage)
        if region == self.home or region in self.queues.regions_heard():
            at = self.queues.last_alive(region, roles)
        else:
            at = self._stage_alive_at.get(region, {}).get(stage)
        return None if at is None else max(0.0, now - at)

    def beat(self, region: str) -> RegionBeat | None:
        seen = self._seen.get(region)
        return seen.beat if seen else None

    def heard_within(self, region: str, seconds: float) -> bool:
        seen = self._seen.get(region)
        return seen is not None and time.monotonic() - seen.heard_at <= seconds

    def silent_for(self, region: str) -> float:
        """Seconds since the region's last beat (0 when never heard)."""
        seen = self._seen.get(region)
        return time.monotonic() - seen.heard_at if seen else 0.0

    def dead(self, region: str) -> bool:
        """Heard from once, and not alive now: its beats stopped, or a stage lost every worker.
        A region never heard from is not dead, only unknown (nothing moves for it)."""
        return region in self._seen and not self.alive(region)

    def alive(self, region: str) -> bool:
        """Heard from lately, and every stage of a request had a live worker there within
        `region_timeout_s`: one beat that counts a stage empty (its workers' heartbeats late on a
        loaded machine) does not kill a region, as one late region beat does not."""
        if not self.heard_within(region, self.config.region_timeout_s):
            return False
        now, stages = time.monotonic(), self._stage_alive_at.get(region, {})
        return all(now - stages.get(stage, -math.inf) <= self.config.region_timeout_s for stage in STAGES)

    def takes_new(self, region: str, model_id: str) -> bool:
        """Alive, not draining, and serving this edge's model."""
        beat = self.beat(region)
        return (self.alive(region) and beat is not None and not beat.draining
                and (not beat.model_ids or model_id in beat.model_ids))

    def rtt_s(self, region: str) -> float:
        """Measured round trip to the region (0 for the regions this edge hears the workers of)."""
        if region in self.queues.regions_seen():
            return 0.0
        return self._rtt.get(region, 0.0)

    def wait_s(self, region: str, priority: Priority) -> float:
        if region in self.queues.regions_seen() or region == self.home:
            return self.queues.wait_s(region, priority)
        beat = self.beat(region)
        return beat.queue_wait_s.get(priority, 0.0) if beat else 0.0

    def prefill_s(self, region: str) -> float:
        beat = self.beat(region)
        return self._prefill.get(region) or (beat.prefill_s if beat else 0.0)

    def ttft_s(self, region: str, priority: Priority) -> float:
        """Estimated time to first token there: the round trip, the queue wait, a prefill."""
        return self.rtt_s(region) + self.wait_s(region, priority) + self.prefill_s(region)

    def export_metrics(self) -> None:
        for region in self.known():
            metrics.set_region_state(region, self.alive(region), self.rtt_s(region),
                                     {p: self.ttft_s(region, p) for p in PRIORITIES})


def forget_region_metrics(region: str) -> None:
    """Drop a forgotten region's gauges, so their series stay as bounded as the regions kept."""
    for gauge in (metrics.REGION_ALIVE, metrics.REGION_RTT):
        try:
            gauge.remove(region)
        except KeyError:
            pass
    for priority in PRIORITIES:
        try:
            metrics.REGION_TTFT_ESTIMATE.remove(region, priority)
        except KeyError:
            pass
