"""The long-running processes: wiring only. Each runs until SIGTERM or SIGINT, then drains."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS

from bus.credentials import redact_url
from bus.jetstream import BusUnavailable, connect_as, ensure_streams, ensure_work_consumers
from bus.subjects import Subjects, check_token
from edge.admission import Admission
from edge.gateway import Gateway
from edge.http_api import OpenAIApi
from edge.live import LiveRequests
from edge.server import EdgeServer
from edge.tenants import ApiKeys
from inference.aggregated import AggregatedService
from inference.budget import budget_for
from inference.decode import DecodeService
from inference.engine import Engine
from inference.prefill import PrefillService
from inference.worker import PoolWorker, Service
from kv_store.transfers import TransferRecords
from services import metrics
from services.settings import Settings

log = structlog.get_logger("grokstack")


def _require(settings: Settings, *names: str) -> None:
    env = {"nats_url": "NATS_URL", "redis_url": "REDIS_URL"}
    for name in names:
        if not getattr(settings, name):
            raise SystemExit(f"{env[name]} is not set: point it at a server, or run `grokstack up` "
                             "to start embedded ones")
    try:  # both end up inside subject names
        check_token(settings.region, "region")
        check_token(settings.subject_prefix, "subject prefix")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _connect_nats(settings: Settings, role: str, name: str):
    """Each process logs in as its role, and may then do only what the role may (bus/permissions.py)."""
    try:
        return await connect_as(settings, role, name)
    except BusUnavailable as exc:
        raise SystemExit(str(exc)) from None


async def _connect_redis(settings: Settings) -> TransferRecords:
    records = TransferRecords(settings.redis_url, settings.kv_key_prefix)
    try:
        await records.ping()
    except Exception as exc:
        raise SystemExit(f"cannot connect to Redis at {redact_url(settings.redis_url)}: "
                         f"{type(exc).__name__}: {exc}") from None
    log.info("redis connected", url=redact_url(settings.redis_url))
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
        return f"ws://{self.server.settings.edge_host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.server.settings.edge_host}:{self.api_port}/v1"

    async def stop(self) -> None:
        await self.server.stop()
        await self.api.stop()
        await self.live.stop()
        await self.gateway.stop()
        await self.nc.drain()


async def start_edge(settings: Settings) -> RunningEdge:
    _require(settings, "nats_url")
    keys = ApiKeys.load(settings.api_keys_file)
    nc = await _connect_nats(settings, "edge", f"edge-{settings.worker_name}")
    gateway = Gateway(settings, nc, settings.worker_name)
    await gateway.start()
    live = LiveRequests(settings, gateway)
    admission = Admission(settings, gateway.queues)
    server = EdgeServer(settings, live, keys, admission)
    api = OpenAIApi(settings, live, keys, admission)
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
    role: str
    nc: NATS
    records: TransferRecords
    engine: Engine
    worker: PoolWorker
    task: asyncio.Task
    metrics_port: int = 0  # where this worker's /metrics is served

    async def stop(self, grace_s: float) -> None:
        log.info("worker stopping", role=self.role)
        await self.worker.stop(grace_s)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if not self.nc.is_closed:  # a worker that lost its connection still stops cleanly
            await self.nc.drain()
        await self.records.close()
        await self.engine.shutdown()
        metrics.stop_serving(self.metrics_port)
        log.info("worker stopped", role=self.role)


async def start_worker(settings: Settings, role: str, engine: Engine | None = None) -> RunningWorker:
    """A prefill, decode or aggregated worker; `engine` defaults to vLLM with the role's profile."""
    _require(settings, "nats_url", "redis_url")
    nc = await _connect_nats(settings, role, f"{role}-{settings.worker_name}")
    records = await _connect_redis(settings)
    subjects = Subjects(settings.subject_prefix)
    js = nc.jetstream()
    await ensure_streams(js, settings, subjects)
    await ensure_work_consumers(js, settings, subjects, "decode" if role == "decode" else "req")
    if settings.cpu_nice:
        os.nice(settings.cpu_nice)  # inherited by the engine's processes
    if engine is None:
        from inference.vllm_engine import VllmEngine
        engine = VllmEngine(settings, role)  # type: ignore[arg-type]
    await engine.start()
    if role == "prefill":
        service: Service = PrefillService(engine, js, subjects, records, settings.worker_name)
        slots = settings.prefill_slots
    elif role == "aggregated":
        service = AggregatedService(engine, records)
        slots = settings.decode_slots
    else:
        service = DecodeService(engine, records, js, subjects)
        slots = settings.decode_slots
    budget = budget_for(settings, role, slots, engine.max_model_len, engine.kv_capacity_tokens)
    log.info("token budget", role=role, capacity_tokens=budget.capacity, slots=slots, max_job_tokens=budget.max_job)
    worker = PoolWorker(settings, nc, service, engine.model_id, slots, budget)
    port = _serve_metrics(settings, role)
    return RunningWorker(role, nc, records, engine, worker, asyncio.create_task(worker.run()), port)


def _serve_metrics(settings: Settings, role: str) -> int:
    """Each worker process serves Prometheus metrics on a port of its own (edges use their API port)."""
    try:
        port = metrics.serve_metrics(settings.edge_host, settings.metrics_port)
    except OSError as exc:
        raise SystemExit(f"cannot serve metrics on {settings.edge_host}:{settings.metrics_port}: {exc}") from None
    log.info(f"metrics at http://{settings.edge_host}:{port}/metrics", role=role)
    return port


async def run_worker(settings: Settings, role: str) -> None:
    stop = _stop_event()
    running = await start_worker(settings, role)
    await asyncio.wait({running.task, asyncio.create_task(stop.wait())},
                       return_when=asyncio.FIRST_COMPLETED)
    await running.stop(settings.drain_timeout_s)
