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
        # request id -> when the cancel arrived, and the attempt it stops below (None: all)
        self._cancelled: dict[str, tuple[float, int | None]] = {}
        self._running: dict[str, tuple[asyncio.Task, int]] = {}  # request id -> its task, its attempt
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
        self._cancelled[cancel.request_id] = (time.monotonic(), self._stricter(cancel))
        task, attempt = self._running.get(cancel.request_id, (None, 0))
        if task is not None and not task.done() and self.is_cancelled(cancel.request_id, attempt):
            log.info("cancelling request", request_id=cancel.request_id, reason=cancel.reason, attempt=attempt)
            task.cancel()

    def _stricter(self, cancel: Cancel) -> int | None:
        """Of this cancel and an earlier one of the request, the one that stops more: a cancel of
        every attempt (the client's) is not narrowed by a later one of superseded attempts."""
        if cancel.request_id not in self._cancelled:
            return cancel.below_attempt
        earlier = self._cancelled[cancel.request_id][1]
        if earlier is None or cancel.below_attempt is None:
            return None
        return max(earlier, cancel.below_attempt)

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self._remember_s
        for request_id in [r for r, (t, _) in self._cancelled.items() if t < horizon]:
            del self._cancelled[request_id]

    def is_cancelled(self, request_id: str, attempt: int = 0) -> bool:
        if request_id not in self._cancelled:
            return False
        below = self._cancelled[request_id][1]
        return below is None or attempt < below

    def watch(self, request_id: str, task: asyncio.Task, attempt: int = 0) -> None:
        self._running[request_id] = (task, attempt)

    def unwatch(self, request_id: str) -> None:
        self._running.pop(request_id, None)
