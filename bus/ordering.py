"""Putting one request's token events back in order, whoever listens (edge or job client).

Events travel as core NATS messages, so a retried publish can duplicate one and a reconnect can
lose one: the listener delivers by sequence number, drops duplicates and holds early arrivals.
Every event is also stored in the capture stream, so a gap is first filled from there (`refill`);
only one that the capture cannot fill either becomes an error instead of a wait forever. The
capture is read only when a gap is seen, never on the normal path.

A request taken over by another region (its region died mid-answer) goes on as a later attempt
from the next sequence number; from then on, events of earlier attempts are dropped, held or
late (a region cut off that comes back), so the listener gets every token once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable

from bus import metrics
from bus.messages import ErrorEvent, Event

# (request id, first missing seq) -> the request's captured events from that seq on
Refill = Callable[[str, int], Awaitable[list[Event]]]


class RequestStream:
    """One request's events, delivered in sequence order exactly once."""

    def __init__(self, request_id: str, gap_timeout_s: float, refill: Refill | None = None,
                 refill_after_s: float = 0.2) -> None:
        self.request_id = request_id
        self._gap_timeout_s = gap_timeout_s
        self._refill = refill
        # A gap this old is taken for a loss rather than a reordering, and looked up.
        self._refill_after_s = refill_after_s
        self._next_seq = 0
        self._early: dict[int, Event] = {}
        self._ready: deque[Event] = deque()
        self._arrived = asyncio.Event()  # wakes `next`: an event is ready, or a gap begins
        self._gap_since = 0.0  # loop time when the current gap was first seen
        self._gap_looked_up = False  # the capture was read for the current gap
        self.duplicates = 0
        self.refilled = 0  # events that came from the capture, not the subscription
        self.attempt = 0  # events of earlier attempts are stale
        self.stale = 0

    def supersede(self, attempt: int, next_seq: int) -> None:
        """Attempt `attempt` goes on from `next_seq`: what earlier attempts sent from there on,
        held here or still coming, is dropped."""
        self.attempt = attempt
        self._early.clear()
        self._ready.clear()
        self._next_seq = next_seq

    def deliver(self, event: Event) -> None:
        if event.attempt < self.attempt:
            self.stale += 1
            metrics.count_stale_event()
            return
        if event.attempt > self.attempt:  # another listener took it over (an edge that adopted it)
            self.supersede(event.attempt, self._next_seq)
        if event.seq < self._next_seq or event.seq in self._early:
            self.duplicates += 1
            return
        was_waiting_for = self._next_seq if self._early else None
        self._early[event.seq] = event
        while self._next_seq in self._early:
            self._ready.append(self._early.pop(self._next_seq))
            self._next_seq += 1
        if self._early and self._next_seq != was_waiting_for:  # a new gap begins
            self._gap_since = asyncio.get_running_loop().time()
            self._gap_looked_up = False
        self._arrived.set()

    async def fill_from_capture(self) -> None:
        """Deliver what the capture holds from the next expected seq on: after a gap, or after
        a reconnect that may have lost the end of the stream."""
        if self._refill is None:
            return
        events = await self._refill(self.request_id, self._next_seq)
        duplicates = self.duplicates
        for event in events:
            self.deliver(event)
        self.refilled += len(events) - (self.duplicates - duplicates)

    async def next(self, timeout: float) -> Event:
        """The next event in order. A gap that lasts `gap_timeout_s`, and that the capture
        cannot fill, becomes a retryable stream_gap error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._ready:
                return self._ready.popleft()
            now = loop.time()
            left = wait = deadline - now
            if self._early:
                gap_age = now - self._gap_since
                if gap_age >= self._gap_timeout_s:
                    await self.fill_from_capture()
                    if not self._ready:
                        return ErrorEvent(request_id=self.request_id, seq=self._next_seq, code="stream_gap",
                                          message=f"token event {self._next_seq} never arrived", retryable=True)
                    continue
                # The missing event may only be late: wait a little, then take it for lost and
                # look in the capture; wait for it until the gap timeout, then look a last time.
                look_now = self._refill is not None and not self._gap_looked_up
                if look_now and gap_age >= self._refill_after_s:
                    self._gap_looked_up = True
                    await self.fill_from_capture()
                    continue
                wait = min(left, (self._refill_after_s if look_now else self._gap_timeout_s) - gap_age)
            if left <= 0:
                raise asyncio.TimeoutError()
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except asyncio.TimeoutError:
                if wait >= left:
                    raise
