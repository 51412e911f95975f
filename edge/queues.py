"""How long a new request would wait: the work queues' depth and the pools' speed, seen from an edge.

Depth comes from JetStream (each (kind, region, priority) consumer's pending count: jobs not yet
taken by any worker, read every `queue_poll_s`, plus what this edge published since). Speed comes
from what the workers measure and say in their heartbeats (inference/queue_meter.py): the
jobs per second each gets through while work waits for it, at its current batch size, and the
jobs it would pull now.

The wait of priority p in one queue is Little's law: the jobs ahead of it (queued at p and above,
which are served first) and itself that the pool's free room does not take at once, over the jobs per
second the pool takes off p's queue: its drain less the jobs of higher priorities it takes
meanwhile (they keep coming after the request and are served before it), as each worker
measures. (More jobs than that room held by JetStream at the last read say the room was taken:
then nothing is taken at once.) Counting jobs, not tokens, keeps it to what was measured: the
rate comes from the same jobs the queue holds, whatever they cost.

A request waits in the request queue for a prefill (its first token: what the budget protects
first) and then, after its first token, in the decode queue for a decode slot. Every request
still waiting for prefill will be decode work ahead of it too; the decode pool drains meanwhile,
so its decode wait is what that pool's queue holds beyond what it gets through while the request
waits for its prefill. The estimate is the longer of the two waits: a decode pool that keeps up
adds nothing, one that does not still bounds what is accepted. Not their sum: the decode pool's
time to get through every answer ahead delays no first token, and a request waits for it only
where that pool has no room.

Workers that report no measurement (an older worker) are weighed as before: queued tokens (the
mean cost of that priority's jobs this edge published) over the sum of their `rate_tokens_s`.
While a pool has no live worker (its only one died and a replacement is starting), its queue is
weighed at the speed it last had, with no free room. A pool with no known speed (no job ended
yet) gives no estimate: nothing is refused for it.

What it keeps is bounded whatever the bus says: at most MAX_REGIONS regions (only regions whose
workers' heartbeats it hears, never one a client named) and MAX_WORKERS workers; a worker unheard
for WORKER_MEMORY_S is forgotten (every restart is a new worker id), and a region with it.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

import structlog
from nats.js import JetStreamContext

from bus.config import BusConfig
from bus.messages import Heartbeat
from bus.roles import ROLES, Role, job_cost, roles_pulling
from bus.priorities import PRIORITIES, Priority, at_or_above
from bus.subjects import WorkKind
from edge import metrics
from edge.config import EdgeConfig

log = structlog.get_logger("grokstack.edge")

KINDS: tuple[WorkKind, ...] = ("req", "decode")
MAX_REGIONS = 64  # regions an edge keeps state for (edge/regions.py too): far more than a fleet has
MAX_WORKERS = 4096  # workers whose heartbeats it remembers at once
# A dead worker is remembered this long: when its stage last had a live worker is what the edge's
# intake judges a replacement by (edge/intake.py), and the speed its pool last had.
WORKER_MEMORY_S = 600.0
FULL_WARNING_S = 60.0  # at most one warning a minute about beats dropped for want of room


@dataclass
class WorkerSeen:
    role: Role
    region: str
    rate_tokens_s: float
    seen: float  # monotonic
    free_slots: int = 0
    room_jobs: int = -1  # jobs it would pull now; -1: it does not measure its queue (older worker)
    drain_jobs_s: float = 0.0  # jobs per second it gets through while work waits (0: unknown yet)
    waits_s: dict[Priority, float] = field(default_factory=dict)  # its recent jobs' measured queue wait
    drain_by_priority_s: dict[Priority, float] = field(default_factory=dict)  # of it, each priority's
    active: int = 0  # jobs it held at its beat
    ended: int = 0  # of those, the ones this edge saw end since (their answers' last events)

    @property
    def measures(self) -> bool:
        return self.room_jobs >= 0

    @property
    def room(self) -> int:
        """Jobs it would pull now: what its beat said, and the room of the jobs seen ending since."""
        return max(0, self.room_jobs) + self.ended


class MeanCost:
    """Smoothed token cost of the jobs published, per (kind, priority)."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self._mean: dict[tuple[WorkKind, Priority], float] = {}

    def add(self, kind: WorkKind, priority: Priority, tokens: int) -> None:
        old = self._mean.get((kind, priority))
        self._mean[(kind, priority)] = tokens if old is None else old + self.alpha * (tokens - old)

    def of(self, kind: WorkKind, priority: Priority) -> float:
        return self._mean.get((kind, priority), 0.0)


class QueueWatch:
    def __init__(self, bus: BusConfig, config: EdgeConfig, js: JetStreamContext) -> None:
        self.bus = bus
        self.config = config
        self.js = js
        self.subjects = bus.subjects
        self.costs = MeanCost()
        self._pending: dict[tuple[WorkKind, str, Priority], int] = defaultdict(int)
        self._published: dict[tuple[WorkKind, str, Priority], int] = defaultdict(int)  # since the last read
        self._workers: dict[tuple[str, Role], WorkerSeen] = {}  # (worker id, role): one process may run two
        self._regions: set[str] = {bus.region}
        # the pool's speed while it had workers: tokens/s (older workers) and jobs/s (measured)
        self._last_speed: dict[tuple[WorkKind, str], float] = {}
        self._last_drain: dict[tuple[WorkKind, str], float] = {}
        self._stopped = False
        self._warned_full = -FULL_WARNING_S

    # ------------------------------------------------------------------ inputs

    def on_beat(self, beat: Heartbeat) -> bool:
        """Remember a worker's beat; False when there is no room for it (not remembered). A worker
        that says it is failed or draining is forgotten at once: it serves nothing new."""
        key = (beat.worker_id, beat.role)
        if beat.state != "serving":
            self._workers.pop(key, None)
            return True
        if key not in self._workers and not self._room_for(beat.region):
            return False
        self._workers[key] = WorkerSeen(
            beat.role, beat.region, beat.rate_tokens_s, time.monotonic(), max(0, beat.slots - beat.active),
            beat.room_jobs, beat.drain_jobs_s, dict(beat.queue_wait_s), dict(beat.drain_by_priority_s),
            active=beat.active)
        self._regions.add(beat.region)
        return True

    def job_ended(self, worker_id: str, role: Role | None) -> None:
        """An answer's last event came from `worker_id` as `role`: its job's room is free, though
        the worker's last beat (sent while it ran) says it is taken. Its next beat says it."""
        worker = self._workers.get((worker_id, role)) if role is not None else None
        if worker is not None and worker.ended < worker.active:
            worker.ended += 1

    def roles_alive(self, region: str, since: float) -> set[Role]:
        """Roles of `region` with a serving worker heard since `since` (monotonic)."""
        return {w.role for w in self._workers.values() if w.region == region and w.seen >= since}

    def _room_for(self, region: str) -> bool:
        """Whether a new worker of `region` may be remembered: forgets the long-gone first."""
        def full() -> bool:
            return len(self._workers) >= MAX_WORKERS or (region not in self._regions
                                                         and len(self._regions) >= MAX_REGIONS)
        if full():
            self.forget_gone()
        if not full():
            return True
        if time.monotonic() - self._warned_full >= FULL_WARNING_S:
            self._warned_full = time.monotonic()
            log.warning("heartbeat of a new worker dropped: too many workers or regions heard",
                        region=region, workers=len(self._workers), regions=len(self._regions))
        return False

    def forget_gone(self) -> None:
        """Forget workers unheard for WORKER_MEMORY_S, and regions left without any (not the edge's)."""
        horizon = time.monotonic() - WORKER_MEMORY_S
        self._workers = {k: w for k, w in self._workers.items() if w.seen >= horizon}
        left = {w.region for w in self._workers.values()} | {self.bus.region}
        for region in self._regions - left:
            self._regions.discard(region)
            for table in (self._last_speed, self._last_drain):
                for key in [k for k in table if k[1] == region]:
                    del table[key]

    def published(self, region: str, priority: Priority, prompt_tokens: int, max_tokens: int) -> None:
        """This edge put a request on the bus: count it before the next read of the queues (of a
        region whose queues it reads; another region's wait comes from its beats)."""
        if region in self._regions:
            self._published[("req", region, priority)] += 1
        for kind in KINDS:
            self.costs.add(kind, priority, job_cost(self.role_of(kind, region), prompt_tokens, max_tokens))

    def stop(self) -> None:
        # A flag as well as the task's cancel: Python 3.11's wait_for (inside nats-py's requests)
        # can swallow a cancel that lands as its answer arrives, and this loop asks often.
        self._stopped = True

    async def run(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.config.queue_poll_s)
            try:
                await self.read()
            except Exception as exc:  # disconnected: keep the last depth, try again
                log.debug("queue depth not read", error=f"{type(exc).__name__}: {exc}")

    async def read(self) -> None:
        self.forget_gone()
        for key in [k for k in (*self._pending, *self._published) if k[1] not in self._regions]:
            self._pending.pop(key, None)
            self._published.pop(key, None)
        self.remember_speeds()
        for region in sorted(self._regions):
            for kind in KINDS:
                for priority in PRIORITIES:
                    key = (kind, region, priority)
                    self._pending[key] = await self._depth(kind, region, priority)
                    self._published[key] = 0
                    metrics.set_queue_depth(kind, region, priority, self._pending[key])
                    measured = self.measured_wait_s(kind, region, priority)
                    metrics.set_queue_wait_measured(kind, region, priority, measured)
            for priority in PRIORITIES:
                metrics.set_queue_wait(region, priority, self.wait_s(region, priority))

    def remember_speeds(self) -> None:
        """Keep each pool's speed while it has live workers: the speed its replacement is
        weighed at while it has none."""
        for region in self._regions:
            for kind in KINDS:
                if speed := self.speed(kind, region):
                    self._last_speed[(kind, region)] = speed
                if drain := self._live_drain(kind, region):
                    self._last_drain[(kind, region)] = drain

    async def _depth(self, kind: WorkKind, region: str, priority: Priority) -> int:
        try:
            info = await self.js.consumer_info(self.subjects.stream(kind, region),
                                               self.subjects.consumer(kind, region, priority), timeout=2)
        except Exception as exc:
            if "not found" in str(exc).lower():  # no worker declared it yet: nothing queued
                return 0
            raise
        return int(info.num_pending or 0)

    # ------------------------------------------------------------------ estimates

    def _alive(self) -> list[WorkerSeen]:
        horizon = time.monotonic() - 3 * self.bus.heartbeat_s
        return [w for w in self._workers.values() if w.seen >= horizon]

    def regions_seen(self) -> set[str]:
        """Regions with a live worker this edge hears (its own server's: worker heartbeats do not
        cross regions, see services/nats_config.py)."""
        return {w.region for w in self._alive()}

    def workers(self, region: str) -> dict[Role, int]:
        counts: dict[Role, int] = defaultdict(int)
        for w in self._alive():
            if w.region == region:
                counts[w.role] += 1
        return dict(counts)

    def free_slots(self, region: str) -> int:
        return sum(w.free_slots for w in self._alive() if w.region == region)

    def role_of(self, kind: WorkKind, region: str) -> Role:
        """Who serves a kind of work in a region, for what its jobs cost: the first role of the
        table that pulls it and has a live worker there (the first that pulls it, when none)."""
        pulling = roles_pulling(kind)
        alive = {w.role for w in self._alive() if w.region == region}
        return next((r for r in pulling if r in alive), pulling[0])

    def speed(self, kind: WorkKind, region: str) -> float:
        return sum(w.rate_tokens_s for w in self._alive() if w.region == region and ROLES[w.role].pulls == kind)

    def depth(self, kind: WorkKind, region: str, priority: Priority) -> int:
        key = (kind, region, priority)  # read with get: asking about a region must not make state
        return self._pending.get(key, 0) + self._published.get(key, 0)

    def queued_tokens(self, kind: WorkKind, region: str, priority: Priority) -> float:
        """Tokens of work that would be served before a new request of `priority`. Requests still
        waiting for prefill will all need decoding too: the decode pool's work ahead counts them."""
        ahead = at_or_above(priority)
        upstream: tuple[WorkKind, ...] = ("req", "decode") if kind == "decode" else ("req",)
        return sum(self.depth(k, region, p) * self.costs.of(kind, p) for p in ahead for k in upstream)

    def last_alive(self, region: str, roles: tuple[Role, ...]) -> float | None:
        """When a worker of one of `roles` in `region` was last heard (monotonic), None when none
        was within WORKER_MEMORY_S."""
        return max((w.seen for w in self._workers.values() if w.region == region and w.role in roles),
                   default=None)

    def regions_heard(self) -> set[str]:
        """Regions whose workers this edge heard within WORKER_MEMORY_S, and its own."""
        return set(self._regions)

    # Little's law over what the workers measured (see the module docstring)

    def _pool(self, kind: WorkKind, region: str) -> list[WorkerSeen]:
        return [w for w in self._alive() if w.region == region and ROLES[w.role].pulls == kind]

    def _live_drain(self, kind: WorkKind, region: str, priority: Priority | None = None) -> float:
        return sum(w.drain_by_priority_s.get(priority, w.drain_jobs_s) if priority else w.drain_jobs_s
                   for w in self._pool(kind, region) if w.measures)

    def measured(self, kind: WorkKind, region: str) -> bool:
        """Whether the pool's workers measure their queue (else the older tokens estimate is used):
        its live ones, or while it has none, the ones it had."""
        pool = self._pool(kind, region)
        return any(w.measures for w in pool) if pool else (kind, region) in self._last_drain

    def drain_jobs_s(self, kind: WorkKind, region: str, priority: Priority | None = None) -> float:
        """Jobs per second the pool takes off its queue while work waits (what its workers
        measured; while it has no live worker, what it had: its replacement's), for `priority`:
        what is left of it to that priority's queue, as its workers measured that too."""
        return self._live_drain(kind, region, priority) or self._last_drain.get((kind, region), 0.0)

    def free_jobs(self, kind: WorkKind, region: str) -> int:
        """Jobs the pool's live workers would take at once (none while it has no live worker)."""
        return sum(w.room for w in self._pool(kind, region) if w.measures)

    def jobs_ahead(self, kind: WorkKind, region: str, priority: Priority) -> int:
        """Jobs served before a new request of `priority` in `kind`'s queue. Requests still
        waiting for prefill will all need decoding too: the decode queue's work ahead counts them."""
        upstream: tuple[WorkKind, ...] = ("req", "decode") if kind == "decode" else ("req",)
        return sum(self.depth(k, region, p) for p in at_or_above(priority) for k in upstream)

    def measured_wait_s(self, kind: WorkKind, region: str, priority: Priority) -> float | None:
        """The longest of the mean queue waits the pool's live workers measured lately for
        `priority` (None: none took a job of it lately): what the estimate is checked against."""
        waits = [w.waits_s[priority] for w in self._pool(kind, region) if priority in w.waits_s]
        return max(waits) if waits else None

    def _queue_wait_s(self, kind: WorkKind, region: str, priority: Priority) -> float:
        """Seconds until a worker takes a new request's job from `kind`'s queue, were it put there now.
        It is taken once the jobs ahead of it and it have found a place: the free room takes some
        at once, the rest as the pool drains, so with none free even the first in line waits for a
        job to end (1 / drain: a full decode pool that ends an answer a second makes the next
        request wait a second for its slot, which counting only the jobs ahead called none).
        A worker with room pulls at once, so more jobs of `kind` pending at or above `priority`
        when JetStream was read than the free room its workers' beats told of say that room was
        taken since: then none counts. Fewer may be jobs on their way to that room (a read
        lands between a publish and the pull it rings for), and the room counts."""
        if not self.measured(kind, region):
            return self._tokens_wait_s(kind, region, priority)
        drain = self.drain_jobs_s(kind, region, priority)
        free = self.free_jobs(kind, region)
        full = sum(self._pending.get((kind, region, p), 0) for p in at_or_above(priority)) > free
        waiting = self.jobs_ahead(kind, region, priority) + 1 - (0 if full else free)
        if not drain or waiting <= 0:  # no speed known yet: no estimate, no refusal
            return 0.0
        return waiting / drain

    def _tokens_wait_s(self, kind: WorkKind, region: str, priority: Priority) -> float:
        """The estimate for workers that do not measure their queue: tokens over their speed."""
        queued = self.queued_tokens(kind, region, priority)
        # a pool without a live worker now is weighed at the speed it had: its replacement's
        speed = self.speed(kind, region) or self._last_speed.get((kind, region), 0.0)
        return queued / speed if queued and speed else 0.0

    def waits_s(self, region: str, priority: Priority) -> tuple[float, float]:
        """A new request's estimated waits: for a prefill (before its first token), and after it
        for a decode slot (the decode pool's queue beyond what it drains meanwhile)."""
        first = self._queue_wait_s("req", region, priority)
        decode = max(0.0, self._queue_wait_s("decode", region, priority) - first)
        return first, decode

    def wait_s(self, region: str, priority: Priority) -> float:
        """The wait a new request of `priority` is judged by: the longer of its two waits."""
        return max(self.waits_s(region, priority))
