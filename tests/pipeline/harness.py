"""The real wiring (start_worker / start_edge) in this process, with engines chosen by the test.
Its streams are provisioned first (services/provision.py; idempotent), as before a real stack:
settings a test changed (another region, stream limits) get theirs."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import nats

from bus.credentials import BusAuth
from bus.jetstream import connect_as
from bus.subjects import Subjects
from inference.engine import Engine
from services.processes import RunningEdge, RunningWorker, start_edge, start_worker
from services.provision import provision
from services.settings import Settings


@dataclass
class Stack:
    settings: Settings
    edge: RunningEdge
    prefill: RunningWorker
    decode: RunningWorker

    @property
    def url(self) -> str:
        return self.edge.url

    @property
    def subjects(self) -> Subjects:
        return self.settings.bus.subjects


@asynccontextmanager
async def running_stack(settings: Settings, prefill: Engine, decode: Engine) -> AsyncIterator[Stack]:
    await provision(settings)
    prefill_worker = await start_worker(settings, "prefill", prefill)
    decode_worker = await start_worker(settings, "decode", decode)
    edge = await start_edge(settings)
    stack = Stack(settings, edge, prefill_worker, decode_worker)
    # Ready as an orchestrator would see it: the edge has heard both workers (it refuses a region
    # without live workers, as `grokstack up` waits for /readyz).
    await eventually(lambda: all(edge.gateway.workers_alive().values()), timeout=10)
    try:
        yield stack
    finally:
        if not edge.nc.is_closed:  # a crashed one has nothing left to stop
            await edge.stop()
        await prefill_worker.stop(1.0)
        await decode_worker.stop(1.0)


@asynccontextmanager
async def another_edge(settings: Settings, name: str = "b") -> AsyncIterator[RunningEdge]:
    """One more edge node on the same bus, with its own edge id and ports."""
    edge = await start_edge(settings.replace(worker_id=f"{settings.bus.worker_id}-{name}"))
    await eventually(lambda: all(edge.gateway.workers_alive().values()), timeout=10)
    try:
        yield edge
    finally:
        if not edge.nc.is_closed:  # a crashed one has nothing left to stop
            await edge.stop()


async def crash(edge: RunningEdge) -> None:
    """Stop an edge the way a crash looks from outside: its NATS connection and its clients'
    sockets drop without a goodbye, and it cancels nothing (its cancels have no bus left)."""
    await edge.nc.close()
    for ws in list(edge.server.server.connections if edge.server.server else []):
        ws.transport.abort()
    runner = edge.api._runner
    for handler in list(runner.server.connections if runner and runner.server else []):
        if handler.transport is not None:
            handler.transport.abort()
    await edge.server.stop()
    await edge.api.stop()
    await edge.live.stop()
    await edge.gateway.stop()


async def crash_worker(worker: RunningWorker) -> None:
    """Stop a worker the way a killed process looks from outside: its connection drops, its jobs
    stop mid-answer, nothing is acknowledged or said."""
    await worker.nc.close()
    for task in [worker.task, *worker.worker._active]:
        task.cancel()
    await asyncio.gather(worker.task, *worker.worker._active, return_exceptions=True)


async def crash_stack(stack: Stack) -> None:
    """Every process of a stack killed at once (with its region's servers: services/regions.py)."""
    await asyncio.gather(crash(stack.edge), crash_worker(stack.prefill), crash_worker(stack.decode))


def ops(settings: Settings) -> BusAuth:
    """The login of the operator role, which tests use to watch and poke the bus."""
    return BusAuth.of(settings.bus, "ops")


@asynccontextmanager
async def bus_client(settings: Settings, role: str = "ops") -> AsyncIterator[nats.NATS]:
    nc = await connect_as(settings.bus, role, f"test-{role}")
    try:
        yield nc
    finally:
        await nc.drain()


async def eventually(check, timeout: float = 10.0, every: float = 0.05):
    """Wait until `check()` returns something truthy; return it (or the last value)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(every)
