"""Taking work from JetStream by priority.

Each (region, priority) has its own durable pull consumer shared by all workers of a pool.
A worker with room in its token budget (inference/budget.py) asks the consumers in priority order,
without waiting, so a backlog of batch work never sits in front of an interactive request; a
lower priority that got less than its minimum share of the work lately is asked first. When every
queue is empty it sleeps until a doorbell rings (the stream republishes a header-only copy of each new message), so an
idle worker costs nothing and wakes within a millisecond.

Pull requests are made here rather than with nats-py's `fetch`, whose lingering requests can
outlive a cancelled fetch and capture a message nobody then reads.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Callable

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.priorities import PRIORITIES, Priority
from bus.subjects import Subjects, WorkKind

log = structlog.get_logger("grokstack.bus")

_END_STATUSES = {"404", "408", "409"}  # no messages / request expired / consumer gone or full


def pull_request(batch: int) -> bytes:
    """The JetStream 'next messages' request: up to `batch`, answer at once."""
    return json.dumps({"batch": batch, "no_wait": True}).encode()


def status_of(msg: Msg) -> str | None:
    """JetStream status messages carry their code in the 'Status' header and no body."""
    if msg.headers and not msg.data:
        return msg.headers.get("Status")
    return None


class PullConsumer:
    """One durable pull consumer, asked for messages without waiting, one request at a time.

    Delivered messages keep their original subject (only status messages come on the reply
    inbox), so replies cannot be told apart by subject: one request in flight at a time, and a
    message that arrives when none is in flight is handed back (nak) for another worker.
    """

    def __init__(self, nc: NATS, stream: str, durable: str, api_prefix: str = "$JS.API") -> None:
        self._nc = nc
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._ids = itertools.count()
        self._lock = asyncio.Lock()
        self._current: tuple[str, asyncio.Queue[Msg]] | None = None
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_reply(self, msg: Msg) -> None:
        current = self._current
        if status_of(msg) is not None:
            if current is not None and msg.subject == current[0]:
                current[1].put_nowait(msg)
        elif current is not None:
            current[1].put_nowait(msg)
        else:
            await msg.nak()  # a late answer to an abandoned request: let another worker have it

    async def fetch_now(self, batch: int, timeout: float = 2.0) -> list[Msg]:
        async with self._lock:
            reply = f"{self._inbox}.{next(self._ids)}"
            queue: asyncio.Queue[Msg] = asyncio.Queue()
            self._current = (reply, queue)
            msgs: list[Msg] = []
            try:
                await self._nc.publish(self._next_subject, pull_request(batch), reply=reply)
                while len(msgs) < batch:
                    msg = await asyncio.wait_for(queue.get(), timeout)
                    status = status_of(msg)
                    if status is None:
                        msgs.append(msg)
                    elif status in _END_STATUSES:
                        break
                    elif status != "100":  # 100 is an idle heartbeat
                        log.warning("unexpected pull status", status=status, subject=self._next_subject)
                        break
            except asyncio.TimeoutError:
                pass  # disconnected or the server is busy: return what arrived, try again later
            finally:
                self._current = None
            return msgs


class ServedShares:
    """What each priority got of the work served lately (token costs, decayed with a half-life),
    so a lower priority below its minimum share is asked first: outside a spike it is not
    starved by a steady stream of more urgent work."""

    def __init__(self, min_shares: dict[Priority, float], half_life_s: float = 10.0) -> None:
        self.min_shares = min_shares
        self.half_life_s = half_life_s
        self._served: dict[Priority, float] = {p: 0.0 for p in PRIORITIES}
        self._at: float | None = None

    def _decay(self, now: float) -> None:
        factor = 0.5 ** (max(0.0, now - (self._at if self._at is not None else now)) / self.half_life_s)
        self._at = now
        for p in PRIORITIES:
            self._served[p] *= factor

    def served(self, priority: Priority, tokens: float, now: float | None = None) -> None:
        self._decay(time.monotonic() if now is None else now)
        self._served[priority] += tokens

    def share(self, priority: Priority) -> float:
        total = sum(self._served.values())
        return self._served[priority] / total if total else 0.0

    def order(self) -> list[Priority]:
        """Priorities below their minimum share first (most behind first), then by urgency."""
        behind = sorted((p for p in PRIORITIES if self.share(p) < self.min_shares.get(p, 0.0)),
                        key=lambda p: self.share(p) - self.min_shares[p])
        return behind + [p for p in PRIORITIES if p not in behind]


class PriorityPuller:
    """Pulls work of one kind for one region, most urgent first, within the worker's room."""

    def __init__(self, nc: NATS, subjects: Subjects, kind: WorkKind, region: str,
                 idle_poll_s: float = 2.0, shares: ServedShares | None = None) -> None:
        self._nc = nc
        self._subjects = subjects
        self._kind = kind
        self._region = region
        self._idle_poll_s = idle_poll_s
        self.shares = shares or ServedShares({})
        stream = subjects.stream(kind, region)
        self._consumers: dict[Priority, PullConsumer] = {
            p: PullConsumer(nc, stream, subjects.consumer(kind, region, p)) for p in PRIORITIES}
        self._bell = asyncio.Event()
        self._bell_sub: Subscription | None = None

    async def start(self) -> None:
        for consumer in self._consumers.values():
            await consumer.start()
        self._bell_sub = await self._nc.subscribe(
            self._subjects.doorbell(self._kind, self._region), cb=self._ring)

    async def stop(self) -> None:
        if self._bell_sub is not None:
            await self._bell_sub.unsubscribe()
        for consumer in self._consumers.values():
            await consumer.stop()

    async def _ring(self, _msg: Msg) -> None:
        self._bell.set()

    def wake(self) -> None:
        """Look for work now: jobs were handed back for redelivery, which rings no doorbell."""
        self._bell.set()

    async def take(self, room: Callable[[Priority], int],
                   hold: Callable[[Priority, Msg], None]) -> list[Msg]:
        """Messages for as much as `room(priority)` allows, asked in `shares.order()`; each is
        passed to `hold` before the next is asked for, so the room shrinks as work is taken.
        Waits for work when every queue with room is empty."""
        while True:
            self._bell.clear()
            taken: list[Msg] = []
            for priority in self.shares.order():
                want = room(priority)
                if want <= 0:
                    continue
                for msg in await self._consumers[priority].fetch_now(want):
                    hold(priority, msg)
                    taken.append(msg)
            if taken:
                return taken
            try:
                # The poll is a safety net for a doorbell lost across a reconnect, and how
                # room freed by another priority's job is noticed while idle.
                await asyncio.wait_for(self._bell.wait(), self._idle_poll_s)
            except asyncio.TimeoutError:
                pass
