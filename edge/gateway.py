"""The edge's side of the bus: publish requests, route token events back, in order.

Events of all requests of this edge arrive on one subscription (`gs.evt.<edge>.*`) and are
sorted into per-request streams that deliver them by sequence number: duplicates are dropped,
early arrivals wait for the ones before them, a gap is filled from the capture stream, and one
the capture cannot fill either is an error. After a reconnect to NATS every open stream looks in
the capture too: events published while the subscription was down are lost to it, not to the
capture.

A request another edge accepted (that edge died, or the client reconnected elsewhere) can be
adopted: its events come from the capture, then from a subscription to `gs.evt.*.<request>`.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import OrderedDict

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus.capture import event_history, find_request
from bus.codec import BadMessage, decode, decode_event, encode
from bus.config import BusConfig
from bus.jetstream import ensure_streams, reconnects
from bus.messages import Cancel, ChatMessage, ChatRequest, ErrorEvent, Event, Heartbeat, SamplingSpec
from bus.roles import STAGES, Role, ROLES
from bus.ordering import RequestStream
from bus.priorities import Priority
from edge.queues import QueueWatch
from edge.config import EdgeConfig

log = structlog.get_logger("grokstack.edge")

GAP_TIMEOUT_S = 5.0
# Publishers flush what they buffered when they reconnect too, maybe after this edge: look twice.
REFILL_AFTER_RECONNECT_S = (1.0, 3.0)
CAPTURE_READERS = 8  # capture look-ups at once after a reconnect


class SubmitFailed(RuntimeError):
    pass


def edge_id_for(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:48]


class Gateway:
    def __init__(self, bus: BusConfig, config: EdgeConfig, nc: NATS, model_id: str) -> None:
        self.bus = bus
        self.config = config
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = bus.subjects
        self.region = bus.region
        self.model_id = model_id  # the model this edge is configured with
        self.edge_id = edge_id_for(bus.worker_name)
        self._streams: dict[str, RequestStream] = {}
        self._orphans: OrderedDict[str, None] = OrderedDict()  # ids we already told to stop
        # (region, role) -> monotonic time of the last heartbeat of a worker of that kind there
        self._last_beat: dict[tuple[str, Role], float] = {}
        self._models: dict[str, float] = {}  # model id -> last heartbeat naming it
        self._adopted: dict[str, Subscription] = {}  # request id -> its events, to any edge
        self._background: set[asyncio.Task] = set()
        self._capture_readers = asyncio.Semaphore(CAPTURE_READERS)
        self.queues = QueueWatch(bus, config, self.js)

    async def start(self) -> None:
        await ensure_streams(self.js, self.bus, self.subjects)
        await self.nc.subscribe(self.subjects.events_of_edge(self.edge_id), cb=self._on_event)
        await self.nc.subscribe(self.subjects.all_heartbeats(), cb=self._on_beat)
        self._spawn(self._watch_reconnects())
        self._spawn(self.queues.run())

    async def stop(self) -> None:
        self.queues.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # ------------------------------------------------------------------ requests

    def new_request(self, messages: list[ChatMessage], sampling: SamplingSpec, priority: Priority,
                    conversation_id: str | None, region: str | None = None,
                    tenant: str | None = None) -> ChatRequest:
        request_id = uuid.uuid4().hex
        now = time.time()
        return ChatRequest(
            request_id=request_id, region=region or self.region, priority=priority,
            messages=messages, sampling=sampling,
            reply_to=self.subjects.events(self.edge_id, request_id),
            conversation_id=conversation_id, created_at=now,
            deadline=now + self.config.request_timeout_s, tenant=tenant)

    async def submit(self, request: ChatRequest) -> RequestStream:
        stream = self._new_stream(request.request_id)
        self._streams[request.request_id] = stream  # before publishing: events may come fast
        try:
            await self.js.publish(self.subjects.request(request.region, request.priority),
                                  encode(request), timeout=5,
                                  headers={"Nats-Msg-Id": request.request_id})
        except Exception as exc:
            self._streams.pop(request.request_id, None)
            raise SubmitFailed(f"the bus did not accept the request: {type(exc).__name__}: {exc}") from None
        return stream

    async def adopt(self, request_id: str) -> tuple[ChatRequest, RequestStream] | None:
        """Follow a request another edge accepted: the request and its events as the capture
        holds them, then its events as they come. None when the capture has no such request."""
        stream = self._new_stream(request_id)
        self._streams[request_id] = stream
        self._adopted[request_id] = await self.nc.subscribe(
            self.subjects.events_of_request(request_id), cb=self._on_adopted_event)
        try:
            await self.nc.flush()  # subscribed before the capture is read: no gap between the two
            history = await event_history(self.js, self.subjects, request_id)
            # A request is first stored before its first event, and lives until its deadline.
            since = (history.first_stored_at or time.time()) - self.config.request_timeout_s
            request = await find_request(self.js, self.subjects, request_id, since,
                                         history.first_stream_seq)
        except Exception as exc:
            log.warning("capture not readable", request_id=request_id, error=f"{type(exc).__name__}: {exc}")
            request = None
        if request is None:
            self.forget(request_id)
            return None
        for event in history.from_seq(0):
            stream.deliver(event)
        return request, stream

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        sub = self._adopted.pop(request_id, None)
        if sub is not None:
            self._spawn(sub.unsubscribe())

    async def cancel(self, request_id: str, reason: str, region: str | None = None) -> None:
        self.forget(request_id)
        self._remember_orphan(request_id)
        try:
            await self.nc.publish(self.subjects.cancel(region or self.region),
                                  encode(Cancel(request_id=request_id, reason=reason)))
        except Exception as exc:
            log.warning("cancel not published", request_id=request_id, error=str(exc))

    def _remember_orphan(self, request_id: str) -> None:
        self._orphans[request_id] = None
        while len(self._orphans) > 10_000:
            self._orphans.popitem(last=False)

    def _new_stream(self, request_id: str) -> RequestStream:
        return RequestStream(request_id, gap_timeout_s=GAP_TIMEOUT_S, refill=self._captured_from)

    async def _captured_from(self, request_id: str, first_seq: int) -> list[Event]:
        async with self._capture_readers:
            try:
                history = await event_history(self.js, self.subjects, request_id)
            except Exception as exc:  # the capture is down too: the gap stays a gap
                log.warning("capture not readable", request_id=request_id, error=f"{type(exc).__name__}: {exc}")
                return []
        found = history.from_seq(first_seq)
        if found:
            log.info("missed events read from the capture", request_id=request_id, first_seq=first_seq,
                     found=len(found))
        return found

    async def _watch_reconnects(self) -> None:
        """What was published while we were away is gone from the subscription, not the capture."""
        async for _ in reconnects(self.nc, 0.25):
            self._spawn(self._refill_after_reconnect())

    async def _refill_after_reconnect(self) -> None:
        for delay in REFILL_AFTER_RECONNECT_S:
            await asyncio.sleep(delay)
            streams = list(self._streams.values())
            log.info("reading events missed during the reconnect from the capture", requests=len(streams))
            await asyncio.gather(*(s.fill_from_capture() for s in streams), return_exceptions=True)

    def _spawn(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:  # e.g. unsubscribing when closed
            log.debug("background bus task failed", error=repr(task.exception()))

    # ------------------------------------------------------------------ inbound

    async def _on_adopted_event(self, msg: Msg) -> None:
        """Events of adopted requests; unlike our own, one nobody waits for is not ours to stop."""
        try:
            event = decode_event(msg.data)
        except BadMessage:
            return
        stream = self._streams.get(event.request_id)
        if stream is not None:
            stream.deliver(event)

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except BadMessage as exc:
            log.warning("dropped malformed event", subject=msg.subject, reason=exc.reason)
            return
        stream = self._streams.get(event.request_id)
        if stream is not None:
            stream.deliver(event)
        elif event.request_id not in self._orphans and not isinstance(event, ErrorEvent):
            # Nobody here waits for it (client gone, edge restarted): stop the work.
            await self.cancel(event.request_id, "no_listener")

    async def _on_beat(self, msg: Msg) -> None:
        try:
            beat = decode(msg.data, Heartbeat)
        except BadMessage:
            return
        now = time.monotonic()
        self.queues.on_beat(beat)
        self._last_beat[(beat.region, beat.role)] = now
        self._models[beat.model_id] = now

    def _horizon(self) -> float:
        return time.monotonic() - 3 * self.bus.heartbeat_s

    def workers_alive(self, region: str | None = None) -> dict[str, bool]:
        """For each stage of a request, whether a worker of `region` (default: the edge's) that
        serves it sent a heartbeat within three heartbeat periods."""
        region = region or self.region
        horizon = self._horizon()
        alive = {role for (r, role), at in self._last_beat.items() if r == region and at >= horizon}
        return {stage: any(stage in ROLES[role].stages for role in alive) for stage in STAGES}

    def health(self) -> tuple[bool, str]:
        ok = self.nc.is_connected
        return ok, "ok\n" if ok else "nats disconnected\n"

    def readiness(self) -> tuple[bool, str]:
        alive = self.workers_alive()
        ok = self.nc.is_connected and all(alive.values())
        body = " ".join(f"{role}={'up' if up else 'down'}" for role, up in alive.items())
        return ok, f"{body} nats={'up' if self.nc.is_connected else 'down'}\n"

    def models(self) -> list[str]:
        """Model ids that live workers serve, and the one this edge is configured with."""
        live = {m for m, at in self._models.items() if at >= self._horizon()}
        return sorted(live | {self.model_id})
