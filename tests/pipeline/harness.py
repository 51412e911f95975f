"""The real wiring (start_worker / start_edge) in this process, with engines chosen by the test."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import nats

from bus.subjects import Subjects
from inference.engine import Engine
from services.processes import RunningEdge, RunningWorker, start_edge, start_worker
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
        return Subjects(self.settings.subject_prefix)


@asynccontextmanager
async def running_stack(settings: Settings, prefill: Engine, decode: Engine) -> AsyncIterator[Stack]:
    prefill_worker = await start_worker(settings, "prefill", prefill)
    decode_worker = await start_worker(settings, "decode", decode)
    edge = await start_edge(settings)
    stack = Stack(settings, edge, prefill_worker, decode_worker)
    try:
        yield stack
    finally:
        await edge.stop()
        await prefill_worker.stop(1.0)
        await decode_worker.stop(1.0)


@asynccontextmanager
async def bus_client(settings: Settings) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(settings.nats_url)
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
