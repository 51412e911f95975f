"""Jobs that no worker ever finished: dead-lettered with the reason, their client told.

A job whose handler fails is dead-lettered by the worker itself on its last delivery. But a job
that kills its worker (a crash, an OOM kill, a hung engine) is never acknowledged by anyone:
JetStream redelivers it until `max_deliver`, then stops and leaves it in the work stream for
good. NATS says so with a MAX_DELIVERIES advisory; every worker listens (one per kind answers,
through a queue group), records the job in the dead-letter stream, sends the client an error
event after the last one it got, and deletes the job from the work stream.
"""

from __future__ import annotations

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus.codec import BadMessage, decode_event, encode, reply_route
from bus.dead_letters import dead_letter
from bus.messages import ErrorEvent
from bus.subjects import Subjects, WorkKind

log = structlog.get_logger("grokstack.bus")


class MaxDeliveriesAdvisory(msgspec.Struct):
    """NATS's `io.nats.jetstream.advisory.v1.max_deliver` (only the fields we use)."""
    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


class ExhaustedJobs:
    def __init__(self, nc: NATS, subjects: Subjects, kind: WorkKind, region: str, worker_id: str) -> None:
        self.nc = nc
        self.region = region
        self.js: JetStreamContext = nc.jetstream()
        self.subjects = subjects
        self.kind = kind
        self.worker_id = worker_id
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subjects.max_deliveries_advisories(self.kind, self.region),
                                            queue=f"{self.subjects.prefix}-exhausted-{self.kind}",
                                            cb=self._on_advisory)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            advisory = msgspec.json.decode(msg.data, type=MaxDeliveriesAdvisory)
        except (msgspec.DecodeError, UnicodeDecodeError):
            log.warning("unreadable max-deliveries advisory", data=msg.data[:200])
            return
        try:
            job = await self.js.get_msg(advisory.stream, advisory.stream_seq)
        except NotFoundError:
            return  # acknowledged at the last moment, or already handled
        reason = (f"delivered {advisory.deliveries} times and never acknowledged: each worker that "
                  "took it died or stalled before finishing it")
        await self._tell_client(job.data, reason)
        await dead_letter(self.js, self.subjects, self.region, self.kind, job.subject or "", job.data, reason,
                          self.worker_id, advisory.deliveries)
        try:
            await self.js.delete_msg(advisory.stream, advisory.stream_seq)
        except NotFoundError:
            pass

    async def _tell_client(self, data: bytes, reason: str) -> None:
        route = reply_route(data)
        if not (route.reply_to and route.request_id
                and self.subjects.is_event_subject(route.reply_to, route.request_id)):
            return
        event = ErrorEvent(request_id=route.request_id, seq=await self._next_seq(route.reply_to),
                           code="internal", message=reason, retryable=True)
        await self.nc.publish(route.reply_to, encode(event))

    async def _next_seq(self, reply_to: str) -> int:
        """After the last event the client was sent (the capture of the client's region has them
        all; in another JetStream domain it is not found, and the error starts at 0)."""
        try:
            capture = self.subjects.stream("capture", self.subjects.event_region(reply_to))
            last = await self.js.get_last_msg(capture, reply_to)
            return decode_event(last.data).seq + 1
        except (NotFoundError, BadMessage):
            return 0
