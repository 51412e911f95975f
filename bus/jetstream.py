"""Connecting to NATS, and the JetStream streams and consumers, declared idempotently.

The streams are made (or their limits updated) in one explicit step, `declare_streams`, as ops
(`grokstack provision`, services/provision.py): no runtime process may change them, so the last
one to start cannot rewrite the fleet's limits. A runtime process waits for its streams at start
(`ensure_streams`) and declares only its durable work consumers (workers) or the mirrors of other
regions' captures (edges). Declarations are built by functions (not module-level objects) so two
brokers in one process never share declaration state.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ExternalStream,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)
from nats.js.errors import BadRequestError, NotFoundError

from bus.config import BusConfig
from bus.credentials import BusAuth, CredentialsError
from bus.priorities import PRIORITIES
from bus.subjects import Subjects, WorkKind
from bus.roles import Role
from bus.section import redact_url

log = structlog.get_logger("grokstack.bus")


class BusUnavailable(RuntimeError):
    pass


CONNECT_TIMEOUT_S = 10.0  # the first connection, all attempts included


async def connect(url: str, name: str, auth: BusAuth | None = None) -> NATS:
    """Connect, failing fast with the URL in the message when nothing answers at start; once
    connected, reconnect forever (a broker restart must not kill the workers). `auth` logs in as
    a role (bus/permissions.py says what each may do); a refused publish or subscription is
    reported to the error callback, so it shows in the log as a permissions violation."""

    said: list[str] = []  # what the server answered, e.g. 'Authorization Violation'

    async def on_error(exc: Exception) -> None:
        said.append(str(exc))
        log.warning("nats error", error=f"{type(exc).__name__}: {exc}")

    async def on_disconnect() -> None:
        if nc is not None and (nc.is_closed or nc.is_draining):
            return  # we are closing it ourselves
        log.warning("nats disconnected", url=shown)

    async def on_reconnect() -> None:
        log.info("nats reconnected", url=shown)

    shown = redact_url(url)  # a password in the URL stays out of logs and messages
    nc: NATS | None = None
    try:
        # The overall bound matters for TLS: nats-py retries a failed handshake (an unknown CA)
        # without end, and a process must exit with the reason instead.
        nc = await asyncio.wait_for(nats.connect(
            url, name=name, connect_timeout=3, max_reconnect_attempts=1, reconnect_time_wait=0.5,
            error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
            max_outstanding_pings=3, ping_interval=10, **(auth.connect_options() if auth else {}),
        ), CONNECT_TIMEOUT_S)
    except Exception as exc:  # NoServersError, auth errors, TLS errors, bad URLs
        login = f" as {str(auth.role)!r}" if auth and auth.login else ""
        # The server's own refusal says more than the connection reset that may follow it.
        told = [m for m in said if "violation" in m.lower()] or said
        answer = f" (the server said: {told[0]})" if told else ""
        raise BusUnavailable(f"cannot connect to NATS at {shown}{login}: {type(exc).__name__}: {exc}"
                             f"{answer}") from None
    nc.options["max_reconnect_attempts"] = -1
    server = nc.connected_url
    log.info("nats connected", url=shown, role=auth.role if auth else None,
             server=f"{server.hostname}:{server.port}" if server else shown)
    return nc


async def reconnects(nc: NATS, every_s: float) -> AsyncIterator[None]:
    """Yields once after each reconnect. nats-py resubscribes by itself but cannot bring back
    what was published meanwhile; its reconnect callback is fixed at connect, so count instead."""
    seen = nc.stats["reconnects"]
    while True:
        await asyncio.sleep(every_s)
        if nc.stats["reconnects"] != seen and nc.is_connected:
            seen = nc.stats["reconnects"]
            yield


async def connect_as(bus: BusConfig, role: Role | str, name: str) -> NATS:
    """`connect` to `bus.nats_url` with the role's login from `bus.nats_credentials`."""
    try:
        auth = BusAuth.of(bus, role)
    except (CredentialsError, ValueError, OSError, ssl.SSLError) as exc:
        raise BusUnavailable(f"cannot connect to NATS at {redact_url(bus.nats_url)}: {exc}") from None
    return await connect(bus.nats_url, name, auth)


def stream_configs(bus: BusConfig, subjects: Subjects) -> list[StreamConfig]:
    """The streams of `bus.region`: its own names and subjects (bus/subjects.py), so several
    regions can share a server, and a region's JetStream never stores another region's traffic."""
    region = bus.region
    work = [
        StreamConfig(
            name=subjects.stream(kind, region),
            subjects=[subjects.stream_subjects(kind, region)],
            retention=RetentionPolicy.WORK_QUEUE,  # a message lives until a worker acks it
            storage=StorageType.FILE,  # accepted work survives a broker restart
            max_age=bus.request_ttl_s,
            discard=DiscardPolicy.NEW,  # when full, refuse new work instead of dropping accepted work
            max_bytes=bus.work_stream_mb * 1024**2,
            # Nats-Msg-Id dedupe: a retried publish, or a second publish of the same
            # idempotency key, is stored (and served) once.
            duplicate_window=min(bus.dedupe_window_s, bus.request_ttl_s),
            # A full copy of every message goes to the capture stream (see below).
            republish=RePublish(src=subjects.stream_subjects(kind, region),
                                dest=subjects.capture_copies_from(kind, region), headers_only=False),
        )
        for kind in ("req", "decode")
    ]
    capture = StreamConfig(
        name=subjects.stream("capture", region), subjects=subjects.captured(region),
        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
        max_age=bus.capture_max_age_s, max_bytes=bus.capture_max_mb * 1024**2,
        discard=DiscardPolicy.OLD,  # the record makes room; the token path never waits on it
        # Copies carry their original's Nats-Msg-Id; the work streams already deduplicated
        # them, so the capture must not drop a legitimate later copy.
        duplicate_window=min(1.0, bus.capture_max_age_s),
        # A header-only copy of every new work message wakes idle workers without polling:
        # gs.cap.req.<region>.<priority> -> gs.bell.req.<region>.<priority>.
        republish=RePublish(src=subjects.capture_copies_of(region),
                            dest=subjects.doorbells_from_copies(region), headers_only=True),
    )
    dead_letters = StreamConfig(
        name=subjects.stream("dlq", region), subjects=[subjects.dead_letters(region)],
        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
        max_age=7 * 24 * 3600.0, max_bytes=bus.dead_letter_stream_mb * 1024**2,
        discard=DiscardPolicy.OLD,
    )
    return [*work, capture, dead_letters]


def mirror_config(bus: BusConfig, subjects: Subjects, region: str, domain: str,
                  since: float | None = None) -> StreamConfig:
    """In this region's JetStream, an asynchronous copy of another region's requests and events,
    under the name of that region's capture stream (so the capture readers of bus/capture.py read
    it as they read their own): an edge here can find a request whose region died with its edge
    and go on with it. Decode jobs and cancels stay home; what the region stored after it was cut
    off is not in it."""
    keep = [subjects.capture_copies_in("req", region), subjects.region_events(region)]
    return StreamConfig(
        name=subjects.stream("capture", region), retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
        max_age=bus.capture_max_age_s, max_bytes=bus.capture_max_mb * 1024**2, discard=DiscardPolicy.OLD,
        mirror=StreamSource(name=subjects.stream("capture", region), external=ExternalStream(api=f"$JS.{domain}.API"),
                            subject_transforms=[SubjectTransform(src=s, dest=s) for s in keep],
                            opt_start_time=_rfc3339(since) if since is not None else None))


async def ensure_mirror(js: JetStreamContext, bus: BusConfig, subjects: Subjects, region: str, domain: str) -> None:
    await _add_or_update(js.add_stream, js.update_stream, mirror_config(bus, subjects, region, domain))


MIRROR_STALLED_S = 10.0  # a mirror's consumer idles with a heartbeat every 5 s: twice that is a stall


async def mirror_stalled(js: JetStreamContext, subjects: Subjects, region: str) -> bool:
    """The mirror of `region` is not syncing: its consumer failed while that region was away, and
    nats-server backs off recreating it (for tens of seconds; it hurries only when a leaf connection
    of the mirroring server itself comes back, which a region that returns across the transit is not)."""
    source = (await js.stream_info(subjects.stream("capture", region))).mirror
    return source is not None and (source.active is None or source.active < 0 or source.active > MIRROR_STALLED_S * 1e9)


REMIRRORED_S = 60.0  # what a mirror made again copies afresh: the last minute, where resumable answers are


async def remake_mirror(js: JetStreamContext, bus: BusConfig, subjects: Subjects, region: str, domain: str) -> None:
    """The mirror again, syncing at once, from the requests and events `region` stored in the last
    REMIRRORED_S (bounded: every edge of every region may do this, over the WAN)."""
    try:
        await js.delete_stream(subjects.stream("capture", region))
    except NotFoundError:
        pass
    await js.add_stream(mirror_config(bus, subjects, region, domain, since=time.time() - REMIRRORED_S))


def _rfc3339(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, timezone.utc).isoformat().replace("+00:00", "Z")


async def declare_streams(js: JetStreamContext, bus: BusConfig, subjects: Subjects) -> list[str]:
    """Create the region's streams, or update them to `bus`'s limits (provisioning, as ops);
    their names."""
    configs = stream_configs(bus, subjects)
    for config in configs:
        await _add_or_update(js.add_stream, js.update_stream, config)
    return [str(c.name) for c in configs]


STREAM_CHECK_S = 0.5


async def ensure_streams(js: JetStreamContext, bus: BusConfig, subjects: Subjects) -> None:
    """Wait up to `bus.streams_wait_s` for the region's streams to exist (provisioned apart, the
    Job may still be running); BusUnavailable naming the missing one, and how to make it, after."""
    deadline = time.monotonic() + bus.streams_wait_s
    for config in stream_configs(bus, subjects):
        name = str(config.name)
        while True:
            try:
                await js.stream_info(name)
                break
            except NotFoundError:
                why = f"stream {name} does not exist: run `grokstack provision`"
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                why = (f"stream {name} cannot be seen ({type(exc).__name__}): JetStream is not up, or this "
                       f"login may not see it")
            if time.monotonic() >= deadline:
                raise BusUnavailable(f"{why} (waited {bus.streams_wait_s:.0f} s)")
            await asyncio.sleep(STREAM_CHECK_S)


def work_consumer_config(bus: BusConfig, subjects: Subjects, kind: WorkKind,
                         priority: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.consumer(kind, bus.region, priority),  # type: ignore[arg-type]
        filter_subject=subjects.work(kind, bus.region, priority),  # type: ignore[arg-type]
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=bus.ack_wait_s,
        max_deliver=bus.max_deliver,
        max_ack_pending=-1,
        inactive_threshold=None,
    )


async def ensure_work_consumers(js: JetStreamContext, bus: BusConfig, subjects: Subjects,
                                kind: WorkKind) -> None:
    stream = subjects.stream(kind, bus.region)
    for priority in PRIORITIES:
        config = work_consumer_config(bus, subjects, kind, priority)
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
