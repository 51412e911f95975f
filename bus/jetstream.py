"""Connecting to NATS and declaring the JetStream streams and consumers, idempotently.

Every process declares what it uses at start, so processes can start in any order against a
fresh server. Declarations are built by functions (not module-level objects) so two brokers in
one process never share declaration state.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from bus.subjects import PRIORITIES, Subjects, WorkKind
from services.settings import Settings

log = structlog.get_logger("grokstack.bus")


class BusUnavailable(RuntimeError):
    pass


async def connect(url: str, name: str) -> NATS:
    """Connect, failing fast with the URL in the message when nothing answers at start; once
    connected, reconnect forever (a broker restart must not kill the workers)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", error=f"{type(exc).__name__}: {exc}")

    async def on_disconnect() -> None:
        if nc is not None and (nc.is_closed or nc.is_draining):
            return  # we are closing it ourselves
        log.warning("nats disconnected", url=url)

    async def on_reconnect() -> None:
        log.info("nats reconnected", url=url)

    nc: NATS | None = None
    try:
        nc = await nats.connect(
            url, name=name, connect_timeout=3, max_reconnect_attempts=1, reconnect_time_wait=0.5,
            error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
            max_outstanding_pings=3, ping_interval=10,
        )
    except Exception as exc:  # NoServersError, auth errors, bad URLs
        raise BusUnavailable(f"cannot connect to NATS at {url}: {type(exc).__name__}: {exc}") from None
    nc.options["max_reconnect_attempts"] = -1
    log.info("nats connected", url=url, server=nc.connected_url.netloc if nc.connected_url else url)
    return nc


def stream_configs(settings: Settings, subjects: Subjects) -> list[StreamConfig]:
    work = [
        StreamConfig(
            name=subjects.stream(kind),
            subjects=[subjects.stream_subjects(kind)],
            retention=RetentionPolicy.WORK_QUEUE,  # a message lives until a worker acks it
            storage=StorageType.FILE,  # accepted work survives a broker restart
            max_age=settings.request_ttl_s,
            discard=DiscardPolicy.NEW,  # when full, refuse new work instead of dropping accepted work
            max_bytes=settings.work_stream_mb * 1024**2,
            # Nats-Msg-Id dedupe: a retried publish, or a second publish of the same
            # idempotency key, is stored (and served) once.
            duplicate_window=min(settings.dedupe_window_s, settings.request_ttl_s),
            # A full copy of every message goes to the capture stream (see below).
            republish=RePublish(src=subjects.stream_subjects(kind),
                                dest=subjects.capture_copies(kind), headers_only=False),
        )
        for kind in ("req", "decode")
    ]
    capture = StreamConfig(
        name=subjects.stream("capture"), subjects=subjects.captured(),
        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
        max_age=settings.capture_max_age_s, max_bytes=settings.capture_max_mb * 1024**2,
        discard=DiscardPolicy.OLD,  # the record makes room; the token path never waits on it
        # Copies carry their original's Nats-Msg-Id; the work streams already deduplicated
        # them, so the capture must not drop a legitimate later copy.
        duplicate_window=min(1.0, settings.capture_max_age_s),
        # A header-only copy of every new work message wakes idle workers without polling:
        # gs.cap.req.<region>.<priority> -> gs.bell.req.<region>.<priority>.
        republish=RePublish(src=subjects.capture_copies(), dest=subjects.doorbells(),
                            headers_only=True),
    )
    dead_letters = StreamConfig(
        name=subjects.stream("dlq"), subjects=[subjects.dead_letters()],
        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
        max_age=7 * 24 * 3600.0, max_bytes=settings.dead_letter_stream_mb * 1024**2,
        discard=DiscardPolicy.OLD,
    )
    return [*work, capture, dead_letters]


async def ensure_streams(js: JetStreamContext, settings: Settings, subjects: Subjects) -> None:
    for config in stream_configs(settings, subjects):
        await _add_or_update(js.add_stream, js.update_stream, config)


def work_consumer_config(settings: Settings, subjects: Subjects, kind: WorkKind,
                         priority: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.consumer(kind, settings.region, priority),  # type: ignore[arg-type]
        filter_subject=subjects.work(kind, settings.region, priority),  # type: ignore[arg-type]
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=-1,
        inactive_threshold=None,
    )


async def ensure_work_consumers(js: JetStreamContext, settings: Settings, subjects: Subjects,
                                kind: WorkKind) -> None:
    stream = subjects.stream(kind)
    for priority in PRIORITIES:
        config = work_consumer_config(settings, subjects, kind, priority)
        try:
            await js.add_consumer(stream, config)  # creates, or updates the editable fields
        except BadRequestError as exc:
            # Settings that cannot change in place: keep serving with the existing consumer.
            log.warning("work consumer kept with its old settings", consumer=config.durable_name,
                        error=str(exc))


async def _add_or_update(add: Any, update: Any, config: StreamConfig) -> None:
    for attempt in range(20):
        try:
            try:
                await add(config)
            except BadRequestError:
                await update(config)
            return
        except (NotFoundError, nats.errors.TimeoutError) as exc:
            # JetStream may still be starting right after the server does.
            if attempt == 19:
                raise BusUnavailable(f"JetStream is not available: {exc}") from None
            await asyncio.sleep(0.25)
