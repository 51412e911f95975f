"""The long-running processes: wiring only. Each runs until SIGTERM or SIGINT, then drains."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from typing import Sequence

import structlog
from nats.aio.client import Client as NATS

from bus.jetstream import BusUnavailable, connect_as, ensure_streams, ensure_work_consumers
from bus.roles import ROLES, Role
from bus.section import redact_url
from edge.admission import Admission
from edge.gateway import Gateway
from edge.http_api import OpenAIApi
from edge.intake import Intake
from edge.live import LiveRequests
from edge.routing import Router
from edge.server import EdgeServer
from edge.tenants import ApiKeys
from inference.budget import budget_for
from inference.config import EngineSetup
from inference.engine import Engine
from inference.pools import Pool, pool_named
from inference.worker import PoolWorker, Service
from kv_store.transfers import TransferRecords
from services import telemetry
from services.settings import Settings

log = structlog.get_logger("grokstack")


def _require(settings: Settings, *urls: str) -> None:
    given = {"nats_url": settings.bus.nats_url, "redis_url": settings.kv.redis_url}
    env = {"nats_url": "NATS_URL", "redis_url": "REDIS_URL"}
    for name in urls:
        if not given[name]:
            raise SystemExit(f"{env[name]} is not set: point it at a server, or run `grokstack up` "
                             "to start embedded ones")


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _connect_nats(settings: Settings, role: Role, name: str):
    """Each process logs in as its role, and may then do only what the role may (bus/permissions.py)."""
    try:
        return await connect_as(settings.bus, role, name)
    except BusUnavailable as exc:
        raise SystemExit(str(exc)) from None


async def _connect_redis(settings: Settings) -> TransferRecords:
    records = TransferRecords(settings.kv.redis_url, settings.kv.kv_key_prefix)
    try:
        await records.ping()
    except Exception as exc:
        raise SystemExit(f"cannot connect to Redis at {redact_url(settings.kv.redis_url)}: "
                         f"{type(exc).__name__}: {exc}") from None
    log.info("redis connected", url=redact_url(settings.kv.redis_url))
    return records


@dataclass
class RunningEdge:
    nc: NATS
    gateway: Gateway
    live: LiveRequests
    server: EdgeServer
    api: OpenAIApi
    port: int
    api_port: int

    @property
    def url(self) -> str:
        return f"ws://{self.server.config.edge_host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.server.config.edge_host}:{self.api_port}/v1"

    async def stop(self) -> None:
        await self.server.stop()
        await self.api.stop()
        await self.live.stop()
        await self.gateway.stop()
        await self.nc.drain()


async def start_edge(settings: Settings) -> RunningEdge:
    _require(settings, "nats_url")
    config = settings.edge
    keys = ApiKeys.load(config.api_keys_file)
    nc = await _connect_nats(settings, Role.EDGE, f"edge-{settings.bus.worker_name}")
    gateway = Gateway(settings.bus, config, nc, settings.served.model_id)
    await gateway.start()
    router = Router(gateway.region, settings.served.model_id, gateway.regions, config, settings.priorities)
    live = LiveRequests(config, gateway, router)
    admission = Admission(config, settings.priorities, gateway.queues, gateway.regions)
    intake = Intake(config, gateway, live, admission, router)
    server = EdgeServer(config, live, keys, intake)
    api = OpenAIApi(config, live, keys, intake, telemetry.exposition)
    return RunningEdge(nc, gateway, live, server, api, await server.start(), await api.start())


async def run_edge(settings: Settings) -> None:
    stop = _stop_event()
    edge = await start_edge(settings)
    await stop.wait()
    log.info("edge stopping")
    await edge.stop()
    log.info("edge stopped")


@dataclass
class RunningWorker:
    role: Role
    nc: NATS
    records: TransferRecords
    engine: Engine
    worker: PoolWorker
    task: asyncio.Task
    metrics_port: int = 0  # where this worker's /metrics, /healthz and /readyz are served

    def health(self) -> tuple[bool, str]:
        """/healthz: the process is up and connected to NATS."""
        ok = self.nc.is_connected
        return ok, f"{self.role} {self.worker.bus.worker_name}: {'ok' if ok else 'nats disconnected'}\n"

    def readiness(self) -> tuple[bool, str]:
        """/readyz: its engine has started (nothing is served before) and it is pulling work: its
        pull loop runs (it ends as the worker starts draining) and NATS is connected."""
        pulling = self.worker.serving and not self.task.done()
        ok = pulling and self.nc.is_connected
        return ok, (f"{self.role} {self.worker.bus.worker_name}: pulling={'yes' if pulling else 'no'} "
                    f"nats={'up' if self.nc.is_connected else 'down'}\n")

    async def stop(self, grace_s: float) -> None:
        log.info("worker stopping", role=self.role)
        await self.worker.stop(grace_s)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if not self.nc.is_closed:  # a worker that lost its connection still stops cleanly
            await self.nc.drain()
        await self.records.close()
        await self.engine.shutdown()
        telemetry.stop_serving(self.metrics_port)
        log.info("worker stopped", role=self.role)


def health_checks(workers: Sequence[RunningWorker]) -> dict[str, telemetry.HealthCheck]:
    """/healthz and /readyz of a process holding `workers` (one, or a simulated fleet's many):
    OK when every worker is, with a line per worker."""
    def every(answers: list[tuple[bool, str]]) -> tuple[bool, str]:
        return all(ok for ok, _ in answers), "".join(body for _, body in answers)
    return {"/healthz": lambda: every([w.health() for w in workers]),
            "/readyz": lambda: every([w.readiness() for w in workers])}


def engine_setup(settings: Settings) -> EngineSetup:
    """What an engine of this stack is built from (inference/config.py)."""
    return EngineSetup(settings.served, settings.engine, settings.spec, settings.kv,
                       cache_root=settings.stack.data_dir / "vllm-cache")


def vllm_engine(settings: Settings, pool: Pool) -> Engine:
    from inference.vllm_engine import VllmEngine  # imports vLLM: only where an engine runs
    return VllmEngine(engine_setup(settings), pool)


async def start_worker(settings: Settings, role: Role | str, engine: Engine | None = None) -> RunningWorker:
    """A worker of one of the pools (inference/pools.py); `engine` defaults to vLLM with the
    pool's engine shape."""
    _require(settings, "nats_url", "redis_url")
    role = Role(role)
    pool = pool_named(role)
    bus = settings.bus
    nc = await _connect_nats(settings, role, f"{role}-{bus.worker_name}")
    records = await _connect_redis(settings)
    subjects = bus.subjects
    js = nc.jetstream()
    kind = ROLES[role].pulls
    assert kind is not None
    await ensure_streams(js, bus, subjects)
    await ensure_work_consumers(js, bus, subjects, kind)
    if settings.engine.cpu_nice:
        os.nice(settings.engine.cpu_nice)  # inherited by the engine's processes
    engine = engine or vllm_engine(settings, pool)
    await engine.start()
    service: Service = pool.service_class()(engine, js, subjects, records, bus.worker_name)
    slots = getattr(settings.engine, pool.slots_field)
    budget = budget_for(settings.worker, settings.priorities, role, slots, engine.max_model_len,
                        engine.kv_capacity_tokens)
    log.info("token budget", role=role, capacity_tokens=budget.capacity, slots=slots, max_job_tokens=budget.max_job)
    worker = PoolWorker(bus, settings.worker, settings.priorities, nc, service, engine.model_id, slots, budget)
    running = RunningWorker(role, nc, records, engine, worker, asyncio.create_task(worker.run()))
    running.metrics_port = serve_endpoints(settings, [running])
    return running


def serve_endpoints(settings: Settings, workers: Sequence[RunningWorker]) -> int:
    """/metrics, /healthz and /readyz of a worker process on its own port (edges use their API
    port), `settings.worker.metrics_port` (0: a free one); returns the port."""
    host, port = settings.edge.edge_host, settings.worker.metrics_port
    try:
        bound = telemetry.serve_metrics(host, port, health_checks(workers))
    except OSError as exc:
        raise SystemExit(f"cannot serve metrics on {host}:{port}: {exc}") from None
    log.info(f"metrics at http://{host}:{bound}/metrics", role=",".join(sorted({str(w.role) for w in workers})),
             health=f"http://{host}:{bound}/readyz")
    return bound


async def run_worker(settings: Settings, role: Role | str) -> None:
    # Until it serves, a worker holds no work, so SIGTERM ends it at once (the default action):
    # its engine's start blocks this loop for a minute, and a stop would otherwise wait for it.
    running = await start_worker(settings, role)
    stop = _stop_event()  # from here on SIGTERM drains (before the pull loop's first step)
    await asyncio.wait({running.task, asyncio.create_task(stop.wait())},
                       return_when=asyncio.FIRST_COMPLETED)
    await running.stop(settings.worker.drain_timeout_s)
