"""`grokstack provision`: create a region's JetStream streams, or update them to the settings'
limits, as the `ops` login. It is the one step that may: runtime roles (edge, workers) wait for
their streams at start and cannot change them (bus/topology.py), so no process that starts last
rewrites the fleet's limits, and the internet-facing edge cannot touch a stream's config.

Run it before the runtime roles start, and again whenever a stream setting changes (in Kubernetes
the Job of infra/k8s/provision.yaml); `grokstack up` and the tests' harnesses call `provision`
once per region. It is idempotent.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import structlog

from bus.jetstream import BusUnavailable, connect_as, declare_streams
from bus.roles import Role
from services.settings import Settings

log = structlog.get_logger("grokstack.provision")


async def provision(settings: Settings) -> list[str]:
    """Create or update the streams of `settings.bus.region` under its prefix; their names."""
    bus = settings.bus
    if not bus.nats_url:
        raise BusUnavailable("NATS_URL is not set: point it at the server whose streams to provision")
    nc = await connect_as(bus, Role.OPS, f"provision-{bus.worker_name}")
    try:
        streams = await declare_streams(nc.jetstream(), bus, bus.subjects)
    finally:
        await nc.drain()
    log.info("streams provisioned", region=bus.region, prefix=bus.subject_prefix, streams=streams)
    return streams


def provision_now(settings: Settings) -> list[str]:
    """`provision` from synchronous code (the lab's clusters, test fixtures), in a thread of its own
    so that it works whether or not an event loop runs in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, provision(settings)).result()
