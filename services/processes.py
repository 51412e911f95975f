"""The long-running processes: wiring only. Each runs until SIGTERM or SIGINT, then drains.

A worker whose engine died (or whose loop stalled) fails instead: its liveness probe says so and
its process exits non-zero (inference/worker.py EXIT_ENGINE_DEAD, EXIT_LOOP_STALLED), so its
supervisor (Kubernetes, `grokstack up`) starts a new one. Each process reports the metrics port it
bound in its ports file when `grokstack up` runs it (services/telemetry.py `report_ports`).
"""

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
from bus.signing import SecretError, Signer
from edge.admission import Admission
from edge.gateway import Gateway
from edge.http_api import OpenAIApi, ServedModel
from edge.intake import Intake
from edge.live import LiveRequests
from edge.resume import ResumeGuard
from edge.routing import Router
from edge.server import EdgeServer
from edge.tenants import ApiKeys
from edge.tokenizer import Tokenizer
from inference.budget import budget_for
from inference.config import EngineSetup
from inference.engine import Engine
from inference.pools import Pool, pool_named
from inference.worker import EXIT_ENGINE_DEAD, LoopWatchdog, PoolWorker, Service
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
    metrics_port: int = 0  # where its /metrics, /healthz and /readyz are served (not the public ports)

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
        telemetry.stop_serving(self.metrics_port)


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
    guard = ResumeGuard(config, _signer(settings))
    server = EdgeServer(config, live, keys, intake, guard)
    served = settings.served
    api = OpenAIApi(config, live, keys, intake, guard, ServedModel(served.model_id, served.model, served.max_model_len),
                    Tokenizer(served.model) if served.model else None)
    edge = RunningEdge(nc, gateway, live, server, api, await server.start(), await api.start())
    # Request ids are exemplars of its metrics: served apart from the public ports.
    host, port = config.edge_host, settings.worker.metrics_port
    telemetry.set_model_name(settings.served.model_id)
    try:
        edge.metrics_port = telemetry.serve_metrics(host, port, {"/healthz": server.health,
                                                                 "/readyz": gateway.readiness})
    except OSError as exc:
        await edge.stop()
        raise SystemExit(f"cannot serve metrics on {host}:{port}: {exc}") from None
    log.info(f"metrics at http://{host}:{edge.metrics_port}/metrics", role="edge",
             health=f"http://{host}:{edge.metrics_port}/readyz")
    report_metrics_port(settings, edge.metrics_port)
    return edge


def _signer(settings: Settings) -> Signer:
    try:
        return Signer.from_file(settings.bus.secret_file)
    except SecretError as exc:
        raise SystemExit(str(exc)) from None


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
        """/healthz (liveness): its engine lives, its event loop ticks (answered from the metrics
        thread: a stalled loop could not answer at all), and its NATS client has not given up. A NATS
        outage while the client reconnects is not a reason to restart: every worker of the fleet
        would reload its model at once."""
        name = f"{self.role} {self.worker.bus.worker_name}"
        stalled = self.worker.stalled_s()
        if self.worker.failure is not None:
            return False, f"{name}: failed: {self.worker.failure}\n"
        if stalled > self.worker.config.worker_loop_stall_s:
            return False, f"{name}: event loop stalled for {stalled:.1f} s\n"
        if self.nc.is_closed:
            return False, f"{name}: nats connection closed for good\n"
        return True, f"{name}: ok{'' if self.nc.is_connected else ', nats reconnecting'}\n"

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
    OK when every worker is, with a line per worker. With none yet (its engine is starting): alive,
    not ready."""
    def every(answers: list[tuple[bool, str]], starting: bool) -> tuple[bool, str]:
        if not answers:
            return starting, "starting: the engine is loading\n"
        return all(ok for ok, _ in answers), "".join(body for _, body in answers)
    return {"/healthz": lambda: every([w.health() for w in workers], True),
            "/readyz": lambda: every([w.readiness() for w in workers], False)}


def engine_setup(settings: Settings) -> EngineSetup:
    """What an engine of this stack is built from (inference/config.py)."""
    return EngineSetup(settings.served, settings.engine, settings.spec, settings.kv,
                       cache_root=settings.stack.data_dir / "vllm-cache", secret_file=settings.bus.secret_file,
                       traces_endpoint=settings.stack.otlp_traces_endpoint)


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
    # Its endpoints before its engine, which takes a minute or more: the port is reported to
    # `grokstack up` at once, and /readyz says "starting" meanwhile.
    workers: list[RunningWorker] = []
    metrics_port = serve_endpoints(settings, workers)
    try:
        engine = engine or vllm_engine(settings, pool)
        await engine.start()
    except BaseException:
        telemetry.stop_serving(metrics_port)
        raise
    service: Service = pool.service_class()(engine, js, subjects, records, bus.worker_name, settings.engine)
    slots = getattr(settings.engine, pool.slots_field)
    budget = budget_for(settings.worker, settings.priorities, role, slots, engine.max_model_len,
                        engine.kv_capacity_tokens)
    log.info("token budget", role=role, capacity_tokens=budget.capacity, slots=slots, max_job_tokens=budget.max_job)
    worker = PoolWorker(bus, settings.worker, settings.priorities, nc, service, engine.model_id, slots, budget)
    running = RunningWorker(role, nc, records, engine, worker, asyncio.create_task(worker.run()), metrics_port)
    workers.append(running)
    return running


def report_metrics_port(settings: Settings, port: int) -> None:
    """Tell `grokstack up` which metrics port this process bound (nothing when it did not start it)."""
    try:
        telemetry.report_ports(settings.stack.ports_file, metrics_port=port)
    except OSError as exc:
        raise SystemExit(f"cannot write the ports file {settings.stack.ports_file}: {exc}") from None


def serve_endpoints(settings: Settings, workers: Sequence[RunningWorker]) -> int:
    """/metrics, /healthz and /readyz of a worker process on its own port (edges use their API
    port), `settings.worker.metrics_port` (0: a free one); returns the port."""
    host, port = settings.edge.edge_host, settings.worker.metrics_port
    telemetry.set_model_name(settings.served.model_id)
    try:
        bound = telemetry.serve_metrics(host, port, health_checks(workers))
    except OSError as exc:
        raise SystemExit(f"cannot serve metrics on {host}:{port}: {exc}") from None
    log.info(f"metrics at http://{host}:{bound}/metrics", role=",".join(sorted({str(w.role) for w in workers})),
             health=f"http://{host}:{bound}/readyz")
    report_metrics_port(settings, bound)
    return bound


async def run_worker(settings: Settings, role: Role | str) -> None:
    # Until it serves, a worker holds no work, so SIGTERM ends it at once (the default action):
    # its engine's start blocks this loop for a minute, and a stop would otherwise wait for it.
    running = await start_worker(settings, role)
    await serve_worker(settings, running, _stop_event())  # from here on SIGTERM drains


async def serve_worker(settings: Settings, running: RunningWorker, stop: asyncio.Event) -> None:
    """Until `stop` is set (it drains, then returns) or the worker fails (its jobs are handed
    back, then SystemExit with EXIT_ENGINE_DEAD); its loop watched meanwhile (LoopWatchdog)."""
    watchdog = LoopWatchdog([running.worker], settings.worker.worker_loop_stall_s).start()
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({running.task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        watchdog.stop()
    await running.stop(settings.worker.drain_timeout_s)
    if running.worker.failure is not None:
        log.critical("worker exiting: it failed", role=running.role, reason=running.worker.failure,
                     exit_code=EXIT_ENGINE_DEAD)
        raise SystemExit(EXIT_ENGINE_DEAD)
