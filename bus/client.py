"""Publishing generation jobs straight onto the bus, for services and batch jobs.

    async with JobClient.connect("nats://...") as client:
        job = await client.submit(client.request([ChatMessage(role="user", content="Hi")]))
        async for event in job:          # TokenEvent ... then FinalEvent or ErrorEvent
            ...
        result = await client.generate([...], max_tokens=64)   # or wait for the whole text

Services import this instead of building subjects and payloads themselves. A job's events come
to `<prefix>.evt.<client>.<request_id>`; this client listens there once for all its jobs.

Idempotency: the idempotency key is the request id, sent as `Nats-Msg-Id`. The request stream
stores a second publish of the same id within its dedupe window once, and says so in its ack;
the second caller then reads the first job's events from the capture stream, from the start, so
both callers get the same result from one generation.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from bus.codec import BadMessage, decode, decode_event, encode
from bus.credentials import BusAuth
from bus.jetstream import connect
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
from bus.subjects import Subjects


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
    """One submitted job: iterate over its events, in order, exactly once each."""

    def __init__(self, client: "JobClient", request_id: str, region: str, stream: RequestStream,
                 joined: bool, timeout_s: float) -> None:
        self.client = client
        self.request_id = request_id
        self.region = region
        self.joined = joined
        self._stream = stream
        self._timeout_s = timeout_s
        self._done = False

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
            await self.client._forget(self.request_id)

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
                 own_connection: bool) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.region = region
        self.client_id = client_id
        self._own_connection = own_connection
        self._streams: dict[str, RequestStream] = {}
        self._subs: list[Subscription] = []
        self._attached: dict[str, Subscription] = {}  # request id -> its capture reader

    @classmethod
    async def connect(cls, url: str, prefix: str = "gs", region: str = "local",
                      client_id: str | None = None, auth: BusAuth | None = None) -> "JobClient":
        """`auth`: the login to use, e.g. `BusAuth.of(settings, "ops")` (bus/credentials.py)."""
        client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        nc = await connect(url, name=f"grokstack-{client_id}", auth=auth)
        return await cls.over(nc, prefix, region, client_id, own_connection=True)

    @classmethod
    async def over(cls, nc: NATS, prefix: str = "gs", region: str = "local",
                   client_id: str | None = None, own_connection: bool = False) -> "JobClient":
        """A client on a connection the caller already has (and keeps)."""
        client = cls(nc, Subjects(prefix), region,
                     msgspec.convert(client_id or f"client-{uuid.uuid4().hex[:12]}", Id),
                     own_connection)
        client._subs.append(await nc.subscribe(client.subjects.events_of_edge(client.client_id),
                                               cb=client._on_event))
        return client

    async def close(self) -> None:
        for sub in [*self._subs, *self._attached.values()]:
            await sub.unsubscribe()
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
                temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | None = None,
                seed: int | None = None, priority: Priority = "standard",
                region: str | None = None, conversation_id: str | None = None,
                idempotency_key: str | None = None, timeout_s: float = 300.0) -> ChatRequest:
        """A validated ChatRequest; the idempotency key, when given, is the request id."""
        request_id = idempotency_key or uuid.uuid4().hex
        now = time.time()
        fields = dict(
            request_id=request_id, region=region or self.region, priority=priority,
            messages=messages,
            sampling=SamplingSpec(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  stop=stop or [], seed=seed),
            reply_to=self.subjects.events(self.client_id, request_id),
            conversation_id=conversation_id, created_at=now, deadline=now + timeout_s)
        try:  # through the wire schema, so a bad value fails here and not in a worker
            return decode(encode(ChatRequest(**fields)), ChatRequest)  # type: ignore[arg-type]
        except (BadMessage, ValueError) as exc:
            raise ValueError(f"invalid job: {exc}") from None

    # ------------------------------------------------------------------ jobs

    async def submit(self, request: ChatRequest, timeout_s: float = 300.0) -> Job:
        stream = RequestStream(request.request_id, gap_timeout_s=5.0)
        self._streams[request.request_id] = stream  # before publishing: events may come fast
        try:
            ack = await self.js.publish(
                self.subjects.request(request.region, request.priority), encode(request),
                timeout=5, headers={"Nats-Msg-Id": request.request_id})
        except Exception as exc:
            self._streams.pop(request.request_id, None)
            raise JobRejected(f"the bus did not accept job {request.request_id}: "
                              f"{type(exc).__name__}: {exc}") from None
        if ack.duplicate:  # someone published this id before: follow that job's events
            self._streams.pop(request.request_id, None)
            return await self.attach(request, timeout_s)
        return Job(self, request.request_id, request.region, stream, joined=False,
                   timeout_s=timeout_s)

    async def generate(self, messages: list[ChatMessage], **options: object) -> JobResult:
        timeout_s = float(options.get("timeout_s", 300.0))  # type: ignore[arg-type]
        job = await self.submit(self.request(messages, **options), timeout_s)  # type: ignore[arg-type]
        return await job.result()

    async def attach(self, request: ChatRequest | str, timeout_s: float = 300.0) -> Job:
        """Follow a job published earlier (by anyone) from its first event, through the
        capture stream: what already happened, then what happens next."""
        request_id = request if isinstance(request, str) else request.request_id
        stream = RequestStream(request_id, gap_timeout_s=5.0)

        async def on_captured(msg: Msg) -> None:
            try:
                stream.deliver(decode_event(msg.data))
            except BadMessage:
                pass

        sub = await self.js.subscribe(
            self.subjects.events_of_request(request_id), stream=self.subjects.stream("capture"),
            ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=on_captured)
        self._attached[request_id] = sub
        self._streams[request_id] = stream
        region = self.region if isinstance(request, str) else request.region
        return Job(self, request_id, region, stream, joined=True, timeout_s=timeout_s)

    async def cancel(self, request_id: str, region: str | None = None,
                     reason: str = "client_cancelled") -> None:
        await self.nc.publish(self.subjects.cancel(region or self.region),
                              encode(Cancel(request_id=request_id, reason=reason)))

    # ------------------------------------------------------------------ inbound

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except BadMessage:
            return
        stream = self._streams.get(event.request_id)
        if stream is not None:  # both paths may deliver one event: the stream drops repeats
            stream.deliver(event)

    async def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        sub = self._attached.pop(request_id, None)
        if sub is not None:
            await sub.unsubscribe()
