"""The edge's side of the bus: the bus client (bus/client.py) under the edge's id, plus what only
an edge needs: which workers and models are alive (heartbeats), the work queues' depth, and
adopting a request another edge accepted.

Requests are published, and their events come back in order, through the same `JobClient` that
back-end services use: events of all requests of this edge arrive on one subscription
(`gs.evt.<region>.<edge>.*`), a gap is filled from the capture stream, and so is whatever was published
while the connection was down.

A request another edge accepted (that edge died, or the client reconnected elsewhere) can be
adopted: its events come from the capture, then from a subscription to `gs.evt.*.*.<request>`, and
the request itself (for its tenant and region) from the capture's copy of it. Another region's
edge can adopt it too: each edge keeps, in its own region's JetStream, a mirror of every other
region's requests and events (bus/jetstream.py mirror_config), and reads them like its own.
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
from bus.codec import BadMessage, decode, encode
from bus.config import BusConfig
from bus.jetstream import ensure_mirror, ensure_streams, mirror_stalled, remake_mirror
from bus.messages import ChatRequest, Heartbeat, RegionBeat
from bus.roles import STAGES, Stage, roles_serving
from edge.tenants import PUBLIC
from edge.config import EdgeConfig
from edge.queues import QueueWatch
from edge.regions import Regions

log = structlog.get_logger("grokstack.edge")

MAX_MODELS = 64  # model ids remembered from heartbeats
MIRROR_CHECK_S = 5.0  # how often a mirror is checked (a stall shows after 10 s without activity)


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
        self._models: dict[str, float] = {}  # model id -> last heartbeat naming it (MAX_MODELS at most)
        self._background: set[asyncio.Task] = set()
        self.queues = QueueWatch(bus, config, self.js)
        self.regions = Regions(self.region, self.edge_id, config, self.queues)
        self.domain = ""  # this region's JetStream domain, from the server at start
        self._mirrored: set[str] = set()  # regions whose requests and events are mirrored here

    async def start(self) -> None:
        await ensure_streams(self.js, self.bus, self.subjects)
        self.domain = (await self.js.account_info()).domain or ""
        # Events nobody here waits for mean a client gone, or an edge restarted: stop that work.
        self.client = await JobClient.over(self.nc, self.bus.subject_prefix, self.region, self.edge_id,
                                           cancel_unrouted=True)
        self.client.capture_regions = self.capture_regions
        await self.nc.subscribe(self.subjects.all_heartbeats(), cb=self._on_beat)
        await self.nc.subscribe(self.subjects.region_beats(), cb=self._on_region_beat)
        for work in (self.queues.run(), self._beat_regions()):
            task = asyncio.create_task(work)
            self._background.add(task)

    async def stop(self) -> None:
        self.queues.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if hasattr(self, "client"):
            await self.client.close()

    # ------------------------------------------------------------------ requests

    async def adopt(self, request_id: str, tenant: str = PUBLIC.name) -> tuple[ChatRequest, Job] | None:
        """Follow `tenant`'s request that another edge accepted: the request and its events as the
        capture holds them, then its events as they come. None when no capture this edge reads
        holds such a request: found by its subject (bus/capture.py), so an unknown id is a few
        single-message gets, never a scan."""
        request = None
        for region in self.capture_regions():
            try:
                request = await find_request(self.js, self.subjects, region, request_id, tenant)
            except Exception as exc:  # that capture is down or absent
                log.debug("capture not readable", request_id=request_id, region=region,
                          error=f"{type(exc).__name__}: {exc}")
            if request is not None:
                break
        if request is None:
            return None
        job = await self.client.attach(request_id, timeout_s=self.config.request_timeout_s)
        return request, job

    # ------------------------------------------------------------------ workers and models

    async def _on_beat(self, msg: Msg) -> None:
        try:
            beat = decode(msg.data, Heartbeat)
        except BadMessage:
            return
        # Which workers are alive is the queue watch's (bounded) record of them.
        if not self.queues.on_beat(beat) or beat.state != "serving":
            return
        now = time.monotonic()
        if beat.model_id not in self._models and len(self._models) >= MAX_MODELS:
            horizon = self._horizon()  # a bus peer could name a new model in every beat
            self._models = {m: at for m, at in self._models.items() if at >= horizon}
            if len(self._models) >= MAX_MODELS:
                return
        self._models[beat.model_id] = now

    def capture_regions(self) -> list[str]:
        """Regions whose capture this edge reads: its own first, then every other one it heard of
        (mirrored here, or on this very server when regions share one)."""
        return [self.region, *(r for r in self.regions.known() if r != self.region)]

    async def _on_region_beat(self, msg: Msg) -> None:
        try:
            beat = decode(msg.data, RegionBeat)
        except BadMessage as exc:
            log.warning("dropped malformed region beat", subject=msg.subject, reason=exc.reason)
            return
        self.regions.on_beat(beat)
        # only a region kept (edge/regions.py bounds them): a lying peer cannot make mirrors without end
        if (beat.domain and beat.domain != self.domain and beat.region not in self._mirrored
                and self.regions.knows(beat.region)):
            self._mirrored.add(beat.region)
            self._spawn(self._mirror(beat.region, beat.domain))

    async def _mirror(self, region: str, domain: str) -> None:
        """Mirror the region's requests and events here, and keep the mirror syncing: its consumer
        fails while the region (or this one) is away, and nats-server waits long to retry it (it
        hurries only when a leaf connection of this server comes back); a mirror that does not sync
        while its region beats is made again."""
        try:
            await ensure_mirror(self.js, self.bus, self.subjects, region, domain)
            log.info("mirroring another region's requests and events", mirrored_region=region, domain=domain)
        except Exception as exc:  # tried again at its next beat
            self._mirrored.discard(region)
            log.warning("mirror not made", mirrored_region=region, error=f"{type(exc).__name__}: {exc}")
            return
        while True:
            await asyncio.sleep(MIRROR_CHECK_S)
            try:
                if self.regions.alive(region) and await mirror_stalled(self.js, self.subjects, region):
                    await self._remake_mirror(region, domain)
            except Exception as exc:
                log.warning("mirror not checked", mirrored_region=region, error=f"{type(exc).__name__}: {exc}")

    async def _remake_mirror(self, region: str, domain: str) -> None:
        try:
            await remake_mirror(self.js, self.bus, self.subjects, region, domain)
            log.info("mirror made again", mirrored_region=region, domain=domain)
        except Exception as exc:
            log.warning("mirror not made again", mirrored_region=region, error=f"{type(exc).__name__}: {exc}")

    def _spawn(self, work) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _beat_regions(self) -> None:
        """Tell every region what this edge sees of the regions whose workers it hears."""
        while True:
            await asyncio.sleep(self.config.region_beat_s)
            try:
                for beat in self.regions.beats(self.models(), self.domain):
                    await self.nc.publish(self.subjects.region_beat(beat.region), encode(beat))
                self.regions.export_metrics()
            except Exception as exc:  # disconnected: the next beat tries again
                log.debug("region beat not sent", error=f"{type(exc).__name__}: {exc}")

    def _horizon(self) -> float:
        return time.monotonic() - 3 * self.bus.heartbeat_s

    def workers_alive(self, region: str | None = None) -> dict[Stage, bool]:
        """For each stage of a request, whether a worker of `region` (default: the edge's) that
        serves it is alive: one that sent a heartbeat within three heartbeat periods, for a region
        whose workers this edge hears; else as the region's beats say (none lately: none alive)."""
        region = region or self.region
        if region != self.region and region not in self.queues.regions_seen():
            beat = self.regions.beat(region)
            fresh = beat is not None and self.regions.heard_within(region, self.config.region_timeout_s)
            workers = beat.workers if beat is not None and fresh else {}
            return {stage: any(workers.get(role, 0) > 0 for role in roles_serving(stage)) for stage in STAGES}
        horizon = self._horizon()
        alive = self.queues.roles_alive(region, horizon)
        return {stage: any(role in alive for role in roles_serving(stage)) for stage in STAGES}

    def health(self) -> tuple[bool, str]:
        """The bus side of liveness: not NATS being up (a NATS outage would restart every edge at
        once, and the client reconnects by itself), only its client not having given up for good."""
        if self.nc.is_closed:
            return False, "nats connection closed for good\n"
        return True, f"nats={'up' if self.nc.is_connected else 'reconnecting'}\n"

    def readiness(self) -> tuple[bool, str]:
        """Ready while NATS is connected. Not the workers: while they are down the edge stays in
        the Service and answers 503 with Retry-After itself; their state is in the body for humans."""
        alive = self.workers_alive()
        ok = self.nc.is_connected
        body = " ".join(f"{role}={'up' if up else 'down'}" for role, up in alive.items())
        return ok, f"nats={'up' if ok else 'down'} {body}\n"

    def models(self) -> list[str]:
        """Model ids that live workers serve, and the one this edge is configured with."""
        live = {m for m, at in self._models.items() if at >= self._horizon()}
        return sorted(live | {self.model_id})
