"""Putting one request's token events back in order, whoever listens (edge or job client).

Events travel as core NATS messages, so a retried publish can duplicate one and a reconnect can
lose one: the listener delivers by sequence number, drops duplicates, holds early arrivals, and
turns a gap that does not fill in time into an error instead of waiting forever.
"""

from __future__ import annotations

import asyncio

from bus.messages import ErrorEvent, Event


class RequestStream:
    """One request's events, delivered in sequence order exactly once."""

    def __init__(self, request_id: str, gap_timeout_s: float) -> None:
        self.request_id = request_id
        self._gap_timeout_s = gap_timeout_s
        self._next_seq = 0
        self._early: dict[int, Event] = {}
        self._ready: asyncio.Queue[Event] = asyncio.Queue()
        self.duplicates = 0

    def deliver(self, event: Event) -> None:
        if event.seq < self._next_seq or event.seq in self._early:
            self.duplicates += 1
            return
        self._early[event.seq] = event
        while self._next_seq in self._early:
            self._ready.put_nowait(self._early.pop(self._next_seq))
            self._next_seq += 1

    async def next(self, timeout: float) -> Event:
        """The next event in order. A gap that lasts `gap_timeout_s` becomes a stream_gap error."""
        wait = min(timeout, self._gap_timeout_s) if self._early else timeout
        try:
            return await asyncio.wait_for(self._ready.get(), wait)
        except asyncio.TimeoutError:
            if self._early and wait < timeout:
                missing = self._next_seq
                return ErrorEvent(request_id=self.request_id, seq=missing, code="stream_gap",
                                  message=f"token event {missing} never arrived")
            raise
