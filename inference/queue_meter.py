"""What a worker's queue really does, measured from the jobs it takes and finishes: what its
heartbeat tells the edges, which estimate a new request's wait from it (edge/queues.py)."""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

from bus.priorities import PRIORITIES, Priority

# What a heartbeat says of the worker's queue is measured over this many seconds: long enough
# to hold a few jobs, short enough to follow a spike within it (QueueMeter).
QUEUE_WINDOW_S = 10.0
QUEUE_WINDOW_JOBS = 1024  # jobs remembered at most within the window (a bound, whatever the rate)
# How long a job takes at a batch size is fitted to the last this many jobs that ended, however
# long ago: an idle worker keeps the speed it had, and a change of work is followed within them.
SERVICE_SAMPLES = 64
MIN_FIT_JOBS = 5  # fewer ended jobs than this are too few to fit a slope to


class Ended(NamedTuple):
    """A job that ended: how many jobs the engine held, on average, while it ran, and how long it took."""
    held: float
    seconds: float


class QueueMeter:
    """What this worker's queue really does, from the jobs it takes and finishes, for the edges'
    estimate of a new request's wait (edge/queues.py): Little's law needs the jobs per second the
    pool takes off its queue while work waits, and the recent waits check it.

    The drain rate is what it finished per second over the last QUEUE_WINDOW_S, or, when more,
    the jobs it may hold at once over how long a job takes when it holds that many. While work
    waits the two agree (its batch is full); the second keeps a worker that was idle (few jobs
    finished lately) from looking slow at the start of a spike.

    How long a job takes depends on how many share the engine with it, and how much differs by
    engine: a GPU's decode step costs about the same for 1 sequence as for 8 (time per job flat
    in the batch), a CPU's, or any engine's prompt pass, shares one set of cores (time per job
    grows in proportion, jobs per second do not). So it is measured, not assumed: each job
    that ends says how many jobs the engine held on average while it ran, and how long it took,
    and a line through the recent ones (seconds = fixed + per_job x held) gives the time at
    the batch size asked about. (Assuming it flat made a shared engine's drain look 4x too fast
    at a spike's onset, and the wait 4x too short: its smoothed time mixed jobs that ran alone with
    the spike's first ones.) Jobs that all ran at one batch size tell nothing of the slope and are
    still taken as flat: a worker whose last 64 jobs all ran alone looks that much too fast at
    the next spike's onset, until its first jobs at a larger batch end. Before its
    first job ends it knows no rate (0): the edges then make no estimate and refuse nothing for it."""

    def __init__(self, window_s: float = QUEUE_WINDOW_S, samples: int = SERVICE_SAMPLES) -> None:
        self.window_s = window_s
        self._taken: deque[tuple[float, Priority, float]] = deque(maxlen=QUEUE_WINDOW_JOBS)  # (when, p, waited)
        self._done: deque[float] = deque(maxlen=QUEUE_WINDOW_JOBS)
        self._ended: deque[Ended] = deque(maxlen=samples)
        self._since = time.monotonic()
        self._held = 0  # jobs in the engine now
        self._held_area, self._area_at = 0.0, self._since  # jobs held x seconds, up to when

    def taken(self, priority: Priority, waited_s: float, now: float | None = None) -> None:
        self._taken.append((time.monotonic() if now is None else now, priority, max(0.0, waited_s)))

    def _advance(self, now: float) -> None:
        self._held_area += self._held * max(0.0, now - self._area_at)
        self._area_at = max(now, self._area_at)

    def started(self, now: float | None = None) -> tuple[float, float]:
        """A job went into the engine: what `ended` needs to weigh it."""
        now = time.monotonic() if now is None else now
        self._advance(now)
        self._held += 1
        return now, self._held_area

    def ended(self, start: tuple[float, float], served: bool, now: float | None = None) -> None:
        """The job `started` gave `start` for left the engine; only a served one is measured."""
        now = time.monotonic() if now is None else now
        self._advance(now)
        self._held = max(0, self._held - 1)
        began, area = start
        if served and (seconds := now - began) > 0:
            self._done.append(now)
            self._ended.append(Ended(max(1.0, (self._held_area - area) / seconds), seconds))

    def service_s(self, held: int) -> float:
        """How long a job takes while the engine holds `held` at once (0: none ended yet): the
        least-squares line through the recent jobs, with neither part below 0. The time is taken
        as flat (their mean) when the jobs tell nothing of a slope: fewer than MIN_FIT_JOBS, all
        at about one batch size, or a slope within two standard errors of none (answers of
        different lengths at different batch sizes make one out of noise, and a line through
        noise would call a flat decode pool slow at a batch it never ran)."""
        jobs = self._ended
        if not jobs:
            return 0.0
        n = len(jobs)
        mean_held = sum(e.held for e in jobs) / n
        mean_s = sum(e.seconds for e in jobs) / n
        spread = sum((e.held - mean_held) ** 2 for e in jobs)
        if n < MIN_FIT_JOBS or spread < 0.25 * n:  # held within about half a job of each other
            return mean_s
        per_job = sum((e.held - mean_held) * (e.seconds - mean_s) for e in jobs) / spread
        fixed = mean_s - per_job * mean_held
        residual = sum((e.seconds - fixed - per_job * e.held) ** 2 for e in jobs) / (n - 2)
        if per_job <= 0 or per_job * per_job * spread <= 4 * residual:  # t = slope / its error <= 2
            return mean_s
        if fixed < 0:  # all of it shared: through the mean, from none
            fixed, per_job = 0.0, mean_s / mean_held
        return fixed + per_job * max(1, held)

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._taken and self._taken[0][0] < horizon:
            self._taken.popleft()
        while self._done and self._done[0] < horizon:
            self._done.popleft()

    def drain_jobs_s(self, holds_at_once: int, now: float | None = None) -> float:
        """Jobs per second it gets through while work waits for it, holding `holds_at_once` (0: no job ended yet)."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        holds = max(1, holds_at_once)
        if not (service_s := self.service_s(holds)):
            return 0.0
        finished = len(self._done) / max(1e-3, min(self.window_s, now - self._since))
        return max(finished, holds / service_s)

    def drain_by_priority_s(self, drain: float, min_shares: dict[Priority, float],
                            now: float | None = None) -> dict[Priority, float]:
        """Of its `drain` (drain_jobs_s), the jobs per second it gets through for each priority
        while work of that priority waits: less the jobs of the priorities above it it takes
        meanwhile (served first, they keep arriving after a request that waits, which a count of
        the jobs ahead of it cannot hold), but never below the priority's minimum share of it
        (bus/priorities.py)."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        span = max(1e-3, min(self.window_s, now - self._since))
        taken = {p: 0 for p in PRIORITIES}
        for _, priority, _ in self._taken:
            taken[priority] += 1
        out, above = {}, 0.0
        for p in PRIORITIES:
            out[p] = round(max(drain * min_shares.get(p, 0.0), drain - above), 3)
            above += taken[p] / span
        return out

    def waits_s(self, now: float | None = None) -> dict[Priority, float]:
        """The mean queue wait of the jobs it took lately, per priority (those it took any of)."""
        self._trim(time.monotonic() if now is None else now)
        waits: dict[Priority, list[float]] = {}
        for _, priority, waited in self._taken:
            waits.setdefault(priority, []).append(waited)
        return {p: round(sum(w) / len(w), 4) for p, w in waits.items()}
