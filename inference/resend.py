"""Events a worker published lately, published again after it reconnects to NATS.

Core NATS publishes that sat in the socket when the server went away are lost, and the capture
stream never saw them either, so the edge cannot fill that gap from it. The worker is the one
place that still has them: after a reconnect it sends again every event of the jobs it is
running and of those that ended in the last `RECENT_S` seconds (a lost final event would
otherwise leave the client waiting until its timeout). Receivers drop repeats by sequence number.
"""

from __future__ import annotations

import time
from collections import deque

import structlog
from nats.aio.client import Client as NATS

from bus.jetstream import reconnects

log = structlog.get_logger("grokstack.worker")

RECENT_S = 10.0

Sent = tuple[str, bytes]  # (subject, payload)


class RecentEvents:
    def __init__(self, recent_s: float = RECENT_S) -> None:
        self._recent_s = recent_s
        self._running: dict[str, list[Sent]] = {}
        self._ended: deque[tuple[float, list[Sent]]] = deque()

    def record(self, request_id: str, subject: str, data: bytes) -> None:
        self._running.setdefault(request_id, []).append((subject, data))

    def end(self, request_id: str) -> None:
        events = self._running.pop(request_id, None)
        if events:
            self._ended.append((time.monotonic(), events))
        self._trim()

    def all(self) -> list[Sent]:
        self._trim()
        return [e for events in self._running.values() for e in events] + [
            e for _, events in self._ended for e in events]

    def _trim(self) -> None:
        horizon = time.monotonic() - self._recent_s
        while self._ended and self._ended[0][0] < horizon:
            self._ended.popleft()


async def resend_after_reconnects(nc: NATS, recent: RecentEvents, every_s: float) -> None:
    """After each reconnect, send the recent events again."""
    async for _ in reconnects(nc, every_s):
        events = recent.all()
        log.info("sending recent events again after a reconnect", events=len(events))
        try:
            for subject, data in events:
                await nc.publish(subject, data)
        except Exception as exc:  # gone again: the next reconnect sends them again
            log.warning("recent events not sent again", error=str(exc))
