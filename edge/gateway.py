"""The edge's side of the bus: publish requests, route token events back, in order.

Events of all requests of this edge arrive on one subscription (`gs.evt.<edge>.*`) and are
sorted into per-request streams that deliver them by sequence number: duplicates are dropped,
early arrivals wait for the ones before them, and a gap that does not fill in time is an error.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus.codec import BadMessage, decode, decode_event, encode
from bus.jetstream import ensure_streams
from bus.messages import Cancel, ChatMessage, ChatRequest, ErrorEvent, Heartbeat, SamplingSpec
from bus.ordering import RequestStream
from bus.subjects import Priority, Subjects
from services.settings import Settings

log = structlog.get_logger("grokstack.edge")


class SubmitFailed(RuntimeError):
    pass


def edge_id_for(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:48]


class Gateway:
    def __init__(self, settings: Settings, nc: NATS, edge_id: str) -> None:
        self.settings = settings
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = Subjects(settings.subject_prefix)
        self.edge_id = edge_id_for(edge_id)
        self._streams: dict[str, RequestStream] = {}
        self._orphans: OrderedDict[str, None] = OrderedDict()  # ids we already told to stop
        # (region, role) -> monotonic time of the last heartbeat of a worker of that kind there
        self._last_beat: dict[tuple[str, str], float] = {}
        self._models: dict[str, float] = {}  # model id -> last heartbeat naming it

    async def start(self) -> None:
        await ensure_streams(self.js, self.settings, self.subjects)
        await self.nc.subscribe(self.subjects.events_of_edge(self.edge_id), cb=self._on_event)
        await self.nc.subscribe(self.subjects.all_heartbeats(), cb=self._on_beat)

    # ------------------------------------------------------------------ requests

    def new_request(self, messages: list[ChatMessage], sampling: SamplingSpec, priority: Priority,
                    conversation_id: str | None, region: str | None = None) -> ChatRequest:
        request_id = uuid.uuid4().hex
        now = time.time()
        return ChatRequest(
            request_id=request_id, region=region or self.settings.region, priority=priority,
            messages=messages, sampling=sampling,
            reply_to=self.subjects.events(self.edge_id, request_id),
            conversation_id=conversation_id, created_at=now,
            deadline=now + self.settings.request_timeout_s)

    async def submit(self, request: ChatRequest) -> RequestStream:
        stream = RequestStream(request.request_id, gap_timeout_s=5.0)
        self._streams[request.request_id] = stream  # before publishing: events may come fast
        try:
            await self.js.publish(self.subjects.request(request.region, request.priority),
                                  encode(request), timeout=5,
                                  headers={"Nats-Msg-Id": request.request_id})
        except Exception as exc:
            self._streams.pop(request.request_id, None)
            raise SubmitFailed(f"the bus did not accept the request: {type(exc).__name__}: {exc}") from None
        return stream

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def cancel(self, request_id: str, reason: str, region: str | None = None) -> None:
        self._streams.pop(request_id, None)
        self._remember_orphan(request_id)
        try:
            await self.nc.publish(self.subjects.cancel(region or self.settings.region),
                                  encode(Cancel(request_id=request_id, reason=reason)))
        except Exception as exc:
            log.warning("cancel not published", request_id=request_id, error=str(exc))

    def _remember_orphan(self, request_id: str) -> None:
        self._orphans[request_id] = None
        while len(self._orphans) > 10_000:
            self._orphans.popitem(last=False)

    # ------------------------------------------------------------------ inbound

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
        self._last_beat[(beat.region, beat.role)] = now
        self._models[beat.model_id] = now

    def _horizon(self) -> float:
        return time.monotonic() - 3 * self.settings.heartbeat_s

    def workers_alive(self, region: str | None = None) -> dict[str, bool]:
        """Whether a prefill and a decode worker of `region` (default: the edge's) sent a
        heartbeat within three heartbeat periods."""
        region = region or self.settings.region
        horizon = self._horizon()
        both = self._last_beat.get((region, "aggregated"), 0.0) >= horizon  # does both stages
        return {role: both or self._last_beat.get((region, role), 0.0) >= horizon
                for role in ("prefill", "decode")}

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
        return sorted(live | {self.settings.model_id})
