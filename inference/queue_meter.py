"""What a worker's queue really does, measured from the jobs it takes and finishes: what its
heartbeat tells the edges, which estimate a new request's wait from it (edge/queues.py)."""

from __future__ import annotations

import time
from collections import deque

from bus.priorities import PRIORITIES, Priority

# What a heartbeat says of the worker's queue is measured over this many seconds: long enough
# to hold a few jobs, short enough to follow a spike within it (QueueMeter).
QUEUE_WINDOW_S = 10.0
QUEUE_WINDOW_JOBS = 1024  # jobs remembered at most within the window (a bound, whatever the rate)


class QueueMeter:
    """What this worker's queue really does, from the jobs it takes and finishes, for the edges'
    estimate of a new request's wait (edge/queues.py): Little's law needs the jobs per second the
    pool takes off its queue while work waits, and the recent waits check it.

    The drain rate is what it finished per second over the last QUEUE_WINDOW_S, or, when more,
    the jobs it may hold at once over how long a job takes at its current batch size (smoothed).
    While work waits the two agree (its batch is full); the second keeps a worker that was
    idle (few jobs finished lately) from looking slow at the start of a spike. Before its first
    job ends it knows no rate (0): the edges then make no estimate and refuse nothing for it."""

    def __init__(self, window_s: float = QUEUE_WINDOW_S, alpha: float = 0.2) -> None:
        self.window_s = window_s
        self.alpha = alpha
        self.service_s = 0.0  # smoothed time from taking a job to its end, at the current batch size
        self._taken: deque[tuple[float, Priority, float]] = deque(maxlen=QUEUE_WINDOW_JOBS)  # (when, p, waited)
        self._done: deque[float] = deque(maxlen=QUEUE_WINDOW_JOBS)
        self._since = time.monotonic()

    def taken(self, priority: Priority, waited_s: float, now: float | None = None) -> None:
        self._taken.append((time.monotonic() if now is None else now, priority, max(0.0, waited_s)))

    def done(self, seconds: float, now: float | None = None) -> None:
        if seconds <= 0:
            return
        self._done.append(time.monotonic() if now is None else now)
        self.service_s = seconds if not self.service_s else self.service_s + self.alpha * (seconds - self.service_s)

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._taken and self._taken[0][0] < horizon:
            self._taken.popleft()
        while self._done and self._done[0] < horizon:
            self._done.popleft()

    def drain_jobs_s(self, holds_at_once: int, now: float | None = None) -> float:
        """Jobs per second it gets through while work waits for it (0: no job ended yet)."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        if not self.service_s:
            return 0.0
        finished = len(self._done) / max(1e-3, min(self.window_s, now - self._since))
        return max(finished, max(1, holds_at_once) / self.service_s)

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
