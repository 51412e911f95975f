"""Cancellations from the edge, applied to whatever this worker is running or will pick up."""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.codec import BadMessage, decode
from bus.messages import Cancel

log = structlog.get_logger("grokstack.worker")


class CancelWatch:
    def __init__(self, nc: NATS, subject: str, remember_s: float) -> None:
        self._nc = nc
        self._subject = subject
        self._remember_s = remember_s
        self._cancelled: dict[str, float] = {}  # request id -> when the cancel arrived
        self._running: dict[str, asyncio.Task] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._subject, cb=self._on_cancel)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = decode(msg.data, Cancel)
        except BadMessage as exc:
            log.warning("ignored malformed cancel", reason=exc.reason)
            return
        self._forget_old()
        self._cancelled[cancel.request_id] = time.monotonic()
        task = self._running.get(cancel.request_id)
        if task is not None and not task.done():
            log.info("cancelling request", request_id=cancel.request_id, reason=cancel.reason)
            task.cancel()

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self._remember_s
        for request_id in [r for r, t in self._cancelled.items() if t < horizon]:
            del self._cancelled[request_id]

    def is_cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

    def watch(self, request_id: str, task: asyncio.Task) -> None:
        self._running[request_id] = task

    def unwatch(self, request_id: str) -> None:
        self._running.pop(request_id, None)
