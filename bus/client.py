"""The one client of the bus for whoever submits jobs and follows their events: back-end services,
the CLI, and the edge (edge/gateway.py builds on it).

    async with await JobClient.connect("nats://...") as client:
        job = await client.submit(client.request([ChatMessage(role="user", content="Hi")]))
        async for event in job:          # TokenEvent ... then FinalEvent or ErrorEvent
            ...
        result = await client.generate([...], max_tokens=64)   # or wait for the whole text

Services import this instead of building subjects and payloads themselves. A back-end service logs
in with a `client` login (`BusAuth.of(bus, "client")`), bound to one tenant and client id: its
jobs are that tenant's, and it reads its own events only. A job's events come
to `<prefix>.evt.<region>.<client>.<request_id>`; this client listens there once for all its jobs, and puts
each job's events back in order (bus/ordering.py): a gap is filled from the capture stream, where
every event is stored, and so is whatever was published while the connection was down (after a
reconnect every open job looks in the capture). An edge also cancels the work of a request
nobody here waits for (`cancel_unrouted`: its client went away, or the edge restarted); a
back-end service does not, so that one restarting under the same client id can attach again.
A client login may not read the capture (it holds every tenant's prompts): under it a gap that
does not fill itself within GAP_TIMEOUT_S ends the job with a retryable `stream_gap` error, and
an attached job follows only what comes to this client id.

Idempotency: the idempotency key is the request id, sent as `Nats-Msg-Id`. The request stream
stores a second publish of the same id within its dedupe window once, and says so in its ack;
the second caller then follows the first job's events (`attach`): what the capture stream holds,
then what comes next, so both callers get the same result from one generation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Literal

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus import metrics
from bus.capture import EventHistory, event_history
from bus.codec import BadMessage, decode, decode_event, encode
from bus.credentials import BusAuth
from bus.jetstream import connect, reconnects
from bus.messages import (
    Cancel,
    ChatMessage,
    ChatRequest,
    ErrorEvent,
    Event,
    FinalEvent,
    Id,
    SamplingSpec,
    TokenEvent,
    Usage,
)
from bus.ordering import RequestStream
from bus.priorities import Priority
from bus.roles import Role
from bus.subjects import Subjects
from bus.tracing import headers_with_context

log = structlog.get_logger("grokstack.bus")

GAP_TIMEOUT_S = 5.0
# Publishers flush what they buffered when they reconnect too, maybe after this client: look twice.
REFILL_AFTER_RECONNECT_S = (1.0, 3.0)
CAPTURE_READERS = 8  # capture look-ups at once after a reconnect
REMEMBERED = 10_000  # ids of requests this client stopped following (not to cancel them twice)


class JobRejected(RuntimeError):
    """The bus did not accept the job (stream full, no JetStream, invalid request)."""


@dataclass
class JobResult:
    request_id: str
    text: str = ""
    finish_reason: str | None = None  # None when the job failed
    usage: Usage | None = None
    error: ErrorEvent | None = None
    events: list[Event] = field(default_factory=list)
    joined: bool = False  # this caller joined a job already published under the same id

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None


class Job:
    """One submitted (or attached) job: its events in order, exactly once each."""

    def __init__(self, client: "JobClient", request_id: str, region: str, stream: RequestStream,
                 joined: bool, timeout_s: float, history: EventHistory | None = None) -> None:
        self.client = client
        self.request_id = request_id
        self.region = region
        self.joined = joined
        self.history = history  # what the capture held when an attached job was joined
        self._stream = stream
        self._timeout_s = timeout_s
        self._done = False

    async def next(self, timeout: float) -> Event:
        """The next event in order (a gap the capture cannot fill is a retryable stream_gap error);
        asyncio.TimeoutError when none comes within `timeout`."""
        return await self._stream.next(timeout)

    async def __aiter__(self) -> AsyncIterator[Event]:
        deadline = time.monotonic() + self._timeout_s
        try:
            while not self._done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {self.request_id}: no final event in {self._timeout_s:.0f} s")
                event = await self._stream.next(left)
                self._done = isinstance(event, (FinalEvent, ErrorEvent))
                yield event
        finally:
            self.client.forget(self.request_id)

    async def result(self) -> JobResult:
        out = JobResult(request_id=self.request_id, joined=self.joined)
        parts: list[str] = []
        async for event in self:
            out.events.append(event)
            if isinstance(event, TokenEvent):
                parts.append(event.text)
            elif isinstance(event, FinalEvent):
                out.finish_reason, out.usage = event.finish_reason, event.usage
            else:
                out.error = event
        out.text = "".join(parts)
        return out

    async def cancel(self, reason: str = "client_cancelled") -> None:
        await self.client.cancel(self.request_id, self.region, reason)


class JobClient:
    def __init__(self, nc: NATS, subjects: Subjects, region: str, client_id: str,
                 own_connection: bool, cancel_unrouted: bool = False, tenant: str = "public",
                 reads_capture: bool = True) -> None:
        self.nc = nc
        self.tenant = tenant  # of the requests it builds (a client login may publish only its own)
        # False under a client login: it may not read the capture, nor other clients' events.
        self.reads_capture = reads_capture
        self.cancel_unrouted = cancel_unrouted
        self.js = nc.jetstream()
        self.subjects = subjects
        self.region = region
        self.client_id = client_id
        self._own_connection = own_connection
        self._streams: dict[str, RequestStream] = {}
        self._attached: dict[str, Subscription] = {}  # request id -> its events, to any client
        self._forgotten: OrderedDict[str, None] = OrderedDict()  # ids we stopped following
        # request id -> (the region of its superseded attempt, its attempt now), kept after the
        # request ends: events of an earlier attempt that still come (a region cut off when the
        # request was taken over, back) are stale, and that region is told again to stop
        self._superseded: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._subs: list[Subscription] = []
        self._background: set[asyncio.Task] = set()
        self._capture_readers = asyncio.Semaphore(CAPTURE_READERS)
        # Whose capture streams to read a request's events from: this client's region, and
        # whichever others this server holds or mirrors (an edge sets it, edge/gateway.py).
        self.capture_regions: Callable[[], list[str]] = lambda: [self.region]

    @classmethod
    async def connect(cls, url: str, prefix: str = "gs", region: str = "local",
                      client_id: str | None = None, auth: BusAuth | None = None) -> "JobClient":
        """`auth`: the login to use, e.g. `BusAuth.of(bus_config, "client")` (bus/credentials.py):
        a client login names the tenant and client id this client acts as."""
        bound = auth if auth is not None and auth.role == Role.CLIENT and auth.login is not None else None
        if bound is not None:
            if client_id and client_id != bound.client_id:
                raise ValueError(f"this login is client {bound.client_id!r}, not {client_id!r}")
            client_id = bound.client_id
        client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        nc = await connect(url, name=f"grokstack-{client_id}", auth=auth)
        return await cls.over(nc, prefix, region, client_id, own_connection=True,
                              tenant=bound.tenant if bound else "public", reads_capture=bound is None)

    @classmethod
    async def over(cls, nc: NATS, prefix: str = "gs", region: str = "local",
                   client_id: str | None = None, own_connection: bool = False,
                   cancel_unrouted: bool = False, tenant: str = "public",
                   reads_capture: bool = True) -> "JobClient":
        """A client on a connection the caller already has (and keeps)."""
        client = cls(nc, Subjects(prefix), region,
                     msgspec.convert(client_id or f"client-{uuid.uuid4().hex[:12]}", Id),
                     own_connection, cancel_unrouted, tenant, reads_capture)
        client._subs.append(await nc.subscribe(client.subjects.events_of_edge(region, client.client_id),
                                               cb=client._on_event))
        client._spawn(client._refill_after_reconnects())
        return client

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for sub in [*self._subs, *self._attached.values()]:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is already closed
                pass
        self._subs.clear()
        self._attached.clear()
        if self._own_connection:
            await self.nc.drain()

    async def __aenter__(self) -> "JobClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ building requests

    def request(self, messages: list[ChatMessage], *, max_tokens: int = 256,
                temperature: float | None = None, top_p: float | None = None, stop: list[str] | None = None,
                seed: int | None = None, priority: Priority = "standard",
                region: str | None = None, conversation_id: str | None = None,
                idempotency_key: str | None = None, timeout_s: float = 300.0,
                tenant: str | None = None) -> ChatRequest:
        """A validated ChatRequest; the idempotency key, when given, is the request id. `tenant`:
        this client's unless given (a client login may publish only its own)."""
        sampling = SamplingSpec(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                stop=stop or [], seed=seed)
        return self.new_request(messages, sampling, priority, region=region, conversation_id=conversation_id,
                                request_id=idempotency_key, timeout_s=timeout_s, tenant=tenant)

    def new_request(self, messages: list[ChatMessage], sampling: SamplingSpec, priority: Priority, *,
                    region: str | None = None, conversation_id: str | None = None,
                    request_id: str | None = None, timeout_s: float = 300.0,
                    tenant: str | None = None, route: str = "",
                    prompt_format: Literal["chat", "text"] = "chat") -> ChatRequest:
        """The request this client would publish: a new id (unless given), its events' subject,
        and a deadline. Checked against the wire schema, so a bad value fails here and not in a
        worker (ValueError)."""
        request_id = request_id or uuid.uuid4().hex
        now = time.time()
        fields = dict(
            request_id=request_id, region=region or self.region, priority=priority, messages=messages,
            sampling=sampling, reply_to=self.reply_to(request_id),
            conversation_id=conversation_id, created_at=now, deadline=now + timeout_s,
            tenant=tenant or self.tenant, route=route, prompt_format=prompt_format)
        try:
            return decode(encode(ChatRequest(**fields)), ChatRequest)  # type: ignore[arg-type]
        except (BadMessage, ValueError) as exc:
            raise ValueError(f"invalid job: {exc}") from None

    def reply_to(self, request_id: str) -> str:
        """Where this client hears a request's events."""
        return self.subjects.events(self.region, self.client_id, request_id)

    # ------------------------------------------------------------------ jobs

    async def submit(self, request: ChatRequest, timeout_s: float = 300.0) -> Job:
        """Publish the request (JobRejected when the bus does not take it) and follow its events."""
        stream = self._new_stream(request.request_id)
        self._streams[request.request_id] = stream  # before publishing: events may come fast
        try:
            ack = await self.js.publish(  # with the caller's trace context (bus/tracing.py)
                self.request_subject(request), encode(request),
                timeout=5, headers=headers_with_context({"Nats-Msg-Id": request.request_id}))
        except Exception as exc:
            self._streams.pop(request.request_id, None)
            raise JobRejected(f"the bus did not accept job {request.request_id}: "
                              f"{type(exc).__name__}: {exc}") from None
        if ack.duplicate:  # someone published this id before: follow that job's events
            self._streams.pop(request.request_id, None)
            return await self.attach(request, timeout_s)
        return Job(self, request.request_id, request.region, stream, joined=False, timeout_s=timeout_s)

    def request_subject(self, request: ChatRequest) -> str:
        """Where a request is published: its region, priority, tenant and id name it."""
        return self.subjects.request(request.region, request.priority, request.tenant or self.tenant,
                                     request.request_id)

    async def generate(self, messages: list[ChatMessage], **options: object) -> JobResult:
        timeout_s = float(options.get("timeout_s", 300.0))  # type: ignore[arg-type]
        job = await self.submit(self.request(messages, **options), timeout_s)  # type: ignore[arg-type]
        return await job.result()

    async def attach(self, request: ChatRequest | str, timeout_s: float = 300.0) -> Job:
        """Follow a job published earlier (by anyone, to any client) from its first event: what the
        capture stream holds, then what comes next (`Job.history` is what the capture held)."""
        request_id = request if isinstance(request, str) else request.request_id
        stream = self._new_stream(request_id)
        self._streams[request_id] = stream
        if self.reads_capture:  # else only its own events come (it may not read others')
            self._attached[request_id] = await self.nc.subscribe(
                self.subjects.events_of_request(request_id), cb=self._on_attached_event)
            await self.nc.flush()  # subscribed before the capture is read: no gap between the two
        history = await self._history(request_id)
        for event in history.from_seq(0):
            stream.deliver(event)
        region = self.region if isinstance(request, str) else request.region
        return Job(self, request_id, region, stream, joined=True, timeout_s=timeout_s, history=history)

    def following(self) -> set[str]:
        """The requests whose events this client routes now (a leak shows here)."""
        return set(self._streams) | set(self._attached)

    def forget(self, request_id: str) -> None:
        """Stop following a request (its job ended, or nobody waits for it any more)."""
        self._streams.pop(request_id, None)
        self._remember(request_id)
        sub = self._attached.pop(request_id, None)
        if sub is not None:
            self._spawn(sub.unsubscribe())

    async def cancel(self, request_id: str, region: str | None = None,
                     reason: str = "client_cancelled") -> None:
        """Stop the request wherever it runs (every worker of its region hears it)."""
        self.forget(request_id)
        await self.stop_work(request_id, region or self.region, reason)

    async def stop_work(self, request_id: str, region: str, reason: str, below_attempt: int | None = None) -> None:
        """Tell `region`'s workers to stop the request (only its attempts below `below_attempt`,
        when given: the request goes on as that one, maybe in the same region)."""
        try:
            await self.nc.publish(self.subjects.cancel(region), encode(Cancel(request_id=request_id, reason=reason,
                                                                              below_attempt=below_attempt)))
        except Exception as exc:
            log.warning("cancel not published", request_id=request_id, error=str(exc))

    async def take_over(self, job: Job, request: ChatRequest) -> None:
        """Go on with `job` as `request`, a later attempt in another region (its region stopped
        answering): published there, followed from its continuation's next seq, events of earlier
        attempts dropped from now on. JobRejected when the bus does not take it."""
        assert request.continuation is not None and request.attempt > 0
        job._stream.supersede(request.attempt, request.continuation.next_seq)
        self._superseded[request.request_id] = (job.region, request.attempt)
        while len(self._superseded) > REMEMBERED:
            self._superseded.popitem(last=False)
        try:
            # Its own id per attempt: a region that saw an earlier attempt must not take this one
            # for a repeat of it.
            msg_id = f"{request.request_id}.{request.attempt}"
            await self.js.publish(self.request_subject(request), encode(request), timeout=5,
                                  headers=headers_with_context({"Nats-Msg-Id": msg_id}))
        except Exception as exc:
            raise JobRejected(f"the bus did not accept attempt {request.attempt} of job {request.request_id}: "
                              f"{type(exc).__name__}: {exc}") from None
        job.region = request.region

    # ------------------------------------------------------------------ inbound

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except BadMessage as exc:
            log.warning("dropped malformed event", subject=msg.subject, reason=exc.reason)
            return
        stream = self._streams.get(event.request_id)
        if self._stale(event, stream):
            return
        if stream is not None:  # both paths may deliver one event: the stream drops repeats
            stream.deliver(event)
        elif (self.cancel_unrouted and event.request_id not in self._forgotten
              and not isinstance(event, ErrorEvent)):
            # Nobody here waits for it (the client went away, or this edge restarted): stop the work.
            await self.cancel(event.request_id, reason="no_listener")

    async def _on_attached_event(self, msg: Msg) -> None:
        """Events of attached jobs; unlike our own, one nobody waits for is not ours to stop."""
        try:
            event = decode_event(msg.data)
        except BadMessage:
            return
        stream = self._streams.get(event.request_id)
        if self._stale(event, stream):
            return
        if stream is not None:
            stream.deliver(event)

    def _stale(self, event: Event, stream: RequestStream | None) -> bool:
        """An event of a superseded attempt: its region still works on it (its cancel may have
        been lost while it was cut off). Told again to stop, once; counted here when the request
        has ended, else by its stream, which drops it."""
        superseded = self._superseded.get(event.request_id)
        if superseded is None or event.attempt >= superseded[1]:
            return False
        region, attempt = superseded
        if region:
            self._superseded[event.request_id] = ("", attempt)
            self._spawn(self.stop_work(event.request_id, region, "superseded", below_attempt=attempt))
        if stream is None:
            metrics.count_stale_event()
            return True
        return False

    # ------------------------------------------------------------------ the capture

    def _new_stream(self, request_id: str) -> RequestStream:
        return RequestStream(request_id, gap_timeout_s=GAP_TIMEOUT_S, refill=self._captured_from)

    async def _history(self, request_id: str) -> EventHistory:
        """A request's events in every capture this client reads (none readable: none)."""
        history = EventHistory({}, None, None)
        if not self.reads_capture:
            return history
        for region in self.capture_regions():
            try:
                history = history.merged(await event_history(self.js, self.subjects, region, request_id))
            except Exception as exc:  # that capture is down or absent: the live events still come
                log.debug("capture not readable", request_id=request_id, region=region,
                          error=f"{type(exc).__name__}: {exc}")
        return history

    async def _captured_from(self, request_id: str, first_seq: int) -> list[Event]:
        async with self._capture_readers:
            history = await self._history(request_id)
        found = history.from_seq(first_seq)
        if found:
            log.info("missed events read from the capture", request_id=request_id, first_seq=first_seq,
                     found=len(found))
        return found

    async def _refill_after_reconnects(self) -> None:
        """What was published while we were away is gone from the subscription, not the capture."""
        async for _ in reconnects(self.nc, 0.25):
            self._spawn(self._refill_open_streams())

    async def _refill_open_streams(self) -> None:
        for delay in REFILL_AFTER_RECONNECT_S:
            await asyncio.sleep(delay)
            streams = list(self._streams.values())
            log.info("reading events missed during the reconnect from the capture", requests=len(streams))
            await asyncio.gather(*(s.fill_from_capture() for s in streams), return_exceptions=True)

    def _remember(self, request_id: str) -> None:
        self._forgotten[request_id] = None
        while len(self._forgotten) > REMEMBERED:
            self._forgotten.popitem(last=False)

    def _spawn(self, work) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:  # e.g. unsubscribing when closed
            log.debug("background bus task failed", error=repr(task.exception()))
