"""The edge's side of the bus: the bus client (bus/client.py) under the edge's id, plus what only
an edge needs: which workers and models are alive (heartbeats), the work queues' depth, and
adopting a request another edge accepted.

Requests are published, and their events come back in order, through the same `JobClient` that
back-end services use: events of all requests of this edge arrive on one subscription
(`gs.evt.<edge>.*`), a gap is filled from the capture stream, and so is whatever was published
while the connection was down.

A request another edge accepted (that edge died, or the client reconnected elsewhere) can be
adopted: its events come from the capture, then from a subscription to `gs.evt.*.<request>`, and
the request itself (for its tenant and region) from the capture's copy of it.
"""

from __future__ import annotations

import asyncio
import re
import time

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bus.capture import find_request
from bus.client import Job, JobClient
from bus.codec import BadMessage, decode
from bus.config import BusConfig
from bus.jetstream import ensure_streams
from bus.messages import ChatRequest, Heartbeat
from bus.roles import STAGES, Role, Stage, roles_serving
from edge.config import EdgeConfig
from edge.queues import QueueWatch

log = structlog.get_logger("grokstack.edge")


def edge_id_for(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:48]


class Gateway:
    client: JobClient  # the bus client under this edge's id, from start()

    def __init__(self, bus: BusConfig, config: EdgeConfig, nc: NATS, model_id: str) -> None:
        self.bus = bus
        self.config = config
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = bus.subjects
        self.region = bus.region
        self.model_id = model_id  # the model this edge is configured with
        self.edge_id = edge_id_for(bus.worker_name)
        # (region, role) -> monotonic time of the last heartbeat of a worker of that kind there
        self._last_beat: dict[tuple[str, Role], float] = {}
        self._models: dict[str, float] = {}  # model id -> last heartbeat naming it
        self._background: set[asyncio.Task] = set()
        self.queues = QueueWatch(bus, config, self.js)

    async def start(self) -> None:
        await ensure_streams(self.js, self.bus, self.subjects)
        # Events nobody here waits for mean a client gone, or an edge restarted: stop that work.
        self.client = await JobClient.over(self.nc, self.bus.subject_prefix, self.region, self.edge_id,
                                           cancel_unrouted=True)
        await self.nc.subscribe(self.subjects.all_heartbeats(), cb=self._on_beat)
        task = asyncio.create_task(self.queues.run())
        self._background.add(task)

    async def stop(self) -> None:
        self.queues.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if hasattr(self, "client"):
            await self.client.close()

    # ------------------------------------------------------------------ requests

    async def adopt(self, request_id: str) -> tuple[ChatRequest, Job] | None:
        """Follow a request another edge accepted: the request and its events as the capture
        holds them, then its events as they come. None when the capture has no such request."""
        client = self.client
        job = await client.attach(request_id, timeout_s=self.config.request_timeout_s)
        history = job.history
        try:
            # A request is first stored before its first event, and lives until its deadline.
            since = ((history.first_stored_at if history else None) or time.time()) - self.config.request_timeout_s
            request = await find_request(self.js, self.subjects, request_id, since,
                                         history.first_stream_seq if history else None)
        except Exception as exc:
            log.warning("capture not readable", request_id=request_id, error=f"{type(exc).__name__}: {exc}")
            request = None
        if request is None:
            client.forget(request_id)
            return None
        return request, job

    # ------------------------------------------------------------------ workers and models

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

    def workers_alive(self, region: str | None = None) -> dict[Stage, bool]:
        """For each stage of a request, whether a worker of `region` (default: the edge's) that
        serves it sent a heartbeat within three heartbeat periods."""
        region = region or self.region
        horizon = self._horizon()
        alive = {role for (r, role), at in self._last_beat.items() if r == region and at >= horizon}
        return {stage: any(role in alive for role in roles_serving(stage)) for stage in STAGES}

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
