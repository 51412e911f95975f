"""Reading captured bus traffic back: what went over the bus, in order, decoded with the schemas.

Everything comes from a region's streams (GS_CAPTURE_<region> and the dead letters in
GS_DLQ_<region>) through short-lived consumers that ack nothing and leave nothing behind, or, for
one request found by its id (`find_request`), a last-by-subject get of its copy. The time window
and the sequence range are applied by the server (where the consumer starts); the other filters
here. Only ops and the runtime roles may read it (bus/topology.py): it holds every tenant's prompts.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import AsyncIterator, Literal

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bus.codec import BadMessage, decode, reply_route
from bus.messages import AnyMessage, ChatRequest, DeadLetter, Event, Message, TokenEvent
from bus.subjects import Subjects

@dataclass(frozen=True)
class Captured:
    source: Literal["capture", "dlq"]
    seq: int  # sequence in its stream
    time: float  # unix seconds when the stream stored it
    subject: str  # the original subject (a work copy's `gs.cap.` removed)
    data: bytes
    message: Message | None  # None when it does not decode
    error: str = ""  # why it does not decode

    @property
    def request_id(self) -> str | None:
        found = getattr(self.message, "request_id", None)
        if found:
            return found
        if isinstance(self.message, DeadLetter):
            return reply_route(self.message.payload.encode()).request_id
        if self.message is None:
            return reply_route(self.data).request_id
        return None

    @property
    def conversation_id(self) -> str | None:
        return getattr(self.message, "conversation_id", None)

    @property
    def kind(self) -> str:
        return type(self.message).__struct_config__.tag if self.message else "undecodable"  # type: ignore[union-attr]


@dataclass(frozen=True)
class Selection:
    request_id: str | None = None
    conversation_id: str | None = None
    subject: str | None = None  # a NATS filter on original subjects, e.g. `gs.req.*.batch.>`
    since: float | None = None  # unix seconds
    until: float | None = None
    first_seq: int | None = None  # the capture stream's sequence range, inclusive
    last_seq: int | None = None
    dead_letters: bool = True  # merge GS_DLQ records in (GS_DLQ_<region>, with its own sequence)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` is one token, `>` the rest (one or more tokens)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def decode_any(data: bytes) -> tuple[Message | None, str]:
    try:
        return decode(data, AnyMessage), ""  # type: ignore[arg-type]
    except BadMessage as exc:
        return None, exc.reason


async def read_stream(js: JetStreamContext, stream: str, subjects: Subjects,
                      source: Literal["capture", "dlq"], selection: Selection,
                      batch: int = 256) -> AsyncIterator[Captured]:
    """One stream's messages in the selection's window, oldest first, up to what the stream
    held when reading began (a live stream does not keep the reader going forever)."""
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return
    last = info.state.last_seq
    if source == "capture" and selection.last_seq is not None:
        last = min(last, selection.last_seq)
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True,
                            **_start(selection, source))
    sub = await js.pull_subscribe("", stream=stream, config=config)
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except Exception:  # nats' TimeoutError: nothing more to read
                return
            for msg in msgs:
                meta = msg.metadata
                if meta.sequence.stream > last:
                    return
                yield _captured(source, meta.sequence.stream, meta.timestamp, msg.subject,
                                msg.data, subjects)
                if meta.num_pending == 0:
                    return
    finally:
        await sub.unsubscribe()


def _start(selection: Selection, source: str) -> dict:
    if source == "capture" and selection.first_seq is not None:
        return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": selection.first_seq}
    if selection.since is not None:
        start = datetime.fromtimestamp(selection.since, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": start}
    return {"deliver_policy": DeliverPolicy.ALL}


def _captured(source: Literal["capture", "dlq"], seq: int, stamp: datetime, subject: str,
              data: bytes, subjects: Subjects) -> Captured:
    message, error = decode_any(data)
    return Captured(source=source, seq=seq, time=stamp.timestamp(),
                    subject=subjects.original_subject(subject), data=data, message=message,
                    error=error)


async def read(js: JetStreamContext, subjects: Subjects, region: str,
               selection: Selection) -> AsyncIterator[Captured]:
    """Everything a region captured that the selection names, in the order the server stored it."""
    sources = [read_stream(js, subjects.stream("capture", region), subjects, "capture", selection)]
    if selection.dead_letters and selection.first_seq is None and selection.last_seq is None:
        sources.append(read_stream(js, subjects.stream("dlq", region), subjects, "dlq", selection))
    matcher = _Matcher(selection)
    async for item in _merge_by_time(sources):
        if matcher(item):
            yield item


class _Matcher:
    """Applies the filters the server cannot; a conversation is followed through the request
    ids its requests introduce, since events and cancels carry only the request id."""

    def __init__(self, selection: Selection) -> None:
        self.selection = selection
        self.conversation_requests: set[str] = set()

    def __call__(self, item: Captured) -> bool:
        s = self.selection
        if s.since is not None and item.time < s.since:
            return False
        if s.until is not None and item.time > s.until:
            return False
        if s.subject is not None and not subject_matches(s.subject, item.subject):
            return False
        if s.request_id is not None and item.request_id != s.request_id:
            return False
        if s.conversation_id is not None:
            if item.conversation_id == s.conversation_id and item.request_id:
                self.conversation_requests.add(item.request_id)
            return item.request_id in self.conversation_requests
        return True


async def _merge_by_time(sources: list[AsyncIterator[Captured]]) -> AsyncIterator[Captured]:
    heads: list[tuple[float, int, int, Captured]] = []
    for index, source in enumerate(sources):
        first = await anext(source, None)
        if first is not None:
            heapq.heappush(heads, (first.time, index, first.seq, first))
    while heads:
        _, index, _, item = heapq.heappop(heads)
        yield item
        following = await anext(sources[index], None)
        if following is not None:
            heapq.heappush(heads, (following.time, index, following.seq, following))


@dataclass
class SentSoFar:
    """What a request's client has been sent, as the capture stream recorded it."""
    token_ids: dict[int, list[int]]  # event seq -> the token ids it carried
    finished: bool  # a final or error event went out
    next_seq: int  # the sequence number of the next event
    last_stored_at: float = 0.0  # unix seconds the last of them was stored

    def tokens_from(self, first_seq: int) -> tuple[list[int], int]:
        """The tokens of events first_seq, first_seq+1, ... up to the first gap, and the
        sequence number after them."""
        out: list[int] = []
        seq = first_seq
        while seq in self.token_ids:
            out += self.token_ids[seq]
            seq += 1
        return out, seq


async def captured_on(js: JetStreamContext, subjects: Subjects, region: str, filter_subject: str,
                      since: float | None = None) -> AsyncIterator[Msg]:
    """A region's captured messages on `filter_subject` (stored since `since`, or all), oldest first,
    up to the last one stored when reading began. Close it (`aclosing`) when leaving early."""
    start = _start(Selection(since=since), "capture")
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True,
                            filter_subject=filter_subject, **start)
    sub = await js.pull_subscribe(filter_subject, stream=subjects.stream("capture", region), config=config)
    try:
        if (await sub.consumer_info()).num_pending == 0:
            return  # nothing captured: no need to wait for a fetch to time out
        while True:
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except Exception:  # nats' TimeoutError: nothing more captured
                return
            for msg in msgs:
                yield msg
                if msg.metadata.num_pending == 0:
                    return
    finally:
        await sub.unsubscribe()


async def sent_so_far(js: JetStreamContext, subjects: Subjects, reply_to: str, attempt: int = 0) -> SentSoFar:
    """Every event of one attempt captured on one request's event subject (in the capture of the
    subject's region), read to the last one stored."""
    sent = SentSoFar({}, False, 0)
    async for msg in captured_on(js, subjects, subjects.event_region(reply_to), reply_to):
        try:
            event = decode(msg.data, Event)  # type: ignore[arg-type]
        except BadMessage:
            continue
        if event.attempt != attempt:
            continue
        if isinstance(event, TokenEvent):
            sent.token_ids[event.seq] = list(event.token_ids)
        else:
            sent.finished = True
        sent.next_seq = max(sent.next_seq, event.seq + 1)
        sent.last_stored_at = msg.metadata.timestamp.timestamp()
    return sent


LOOKUP_TIMEOUT_S = 1.0  # a capture in a region cut off from here does not answer: give up soon


async def latest_attempt(nc: NATS, subjects: Subjects, reply_to: str, patience_s: float = 2.0) -> int | None:
    """The attempt of the last event captured on a request's event subject, in the capture of the
    subject's region: this server's JetStream when it holds that capture; else the region's own
    JetStream domain (named after the region, services/nats_config.py), asked for `patience_s`
    (a region that just came back is still joining the others), then this server's mirror of it
    (which may lag). None when there is none, or no answer."""
    region = subjects.event_region(reply_to)
    stream = subjects.stream("capture", region)
    here = nc.jetstream(timeout=LOOKUP_TIMEOUT_S)
    try:
        mirrored = (await here.stream_info(stream)).config.mirror is not None
        sources = [nc.jetstream(domain=region, timeout=LOOKUP_TIMEOUT_S), here] if mirrored else [here]
    except NotFoundError:
        sources = [nc.jetstream(domain=region, timeout=LOOKUP_TIMEOUT_S)]
    except Exception:  # this server's JetStream does not answer either
        return None
    give_up = time.monotonic() + patience_s
    for js in sources:
        while True:
            try:
                last = await js.get_last_msg(stream, reply_to)
                break
            except NotFoundError as exc:
                if "stream" in str(exc).lower():
                    last = None
                    break
                return None  # the capture holds no event of the request
            except Exception:  # no answer (cut off, not joined yet), no permission: again, then the next
                if js is here or time.monotonic() >= give_up:
                    last = None
                    break
                await asyncio.sleep(0.2)
        if last is None:
            continue
        try:
            return decode(last.data, Event).attempt  # type: ignore[arg-type]
        except BadMessage:
            return None
    return None


@dataclass
class EventHistory:
    """A request's events as the capture stream holds them, by whichever edge or client they
    went to."""
    events: dict[int, Event]  # event seq -> the event (a repeat keeps the first, a later attempt wins)
    first_stored_at: float | None  # unix seconds the first one was stored; None when none was
    first_stream_seq: int | None  # its sequence in the capture stream
    region: str = ""  # whose capture stream that is

    def from_seq(self, seq: int) -> list[Event]:
        return [self.events[s] for s in sorted(self.events) if s >= seq]

    def merged(self, other: "EventHistory") -> "EventHistory":
        """Both together (a request's events in several regions' captures): a later attempt wins."""
        events = dict(self.events)
        for seq, event in other.events.items():
            if seq not in events or event.attempt > events[seq].attempt:
                events[seq] = event
        firsts = [h for h in (self, other) if h.first_stored_at is not None]
        first = min(firsts, key=lambda h: h.first_stored_at or 0.0) if firsts else self
        return EventHistory(events, first.first_stored_at, first.first_stream_seq, first.region)


async def event_history(js: JetStreamContext, subjects: Subjects, region: str,
                        request_id: str) -> EventHistory:
    """A request's events as `region`'s capture holds them (its client's region)."""
    history = EventHistory({}, None, None, region)
    async for msg in captured_on(js, subjects, region, subjects.events_of_request(request_id)):
        if history.first_stored_at is None:
            history.first_stored_at = msg.metadata.timestamp.timestamp()
            history.first_stream_seq = msg.metadata.sequence.stream
        try:
            event = decode(msg.data, Event)  # type: ignore[arg-type]
        except BadMessage:
            continue
        held = history.events.get(event.seq)
        if held is None or event.attempt > held.attempt:  # a repeat keeps the first; a later attempt wins
            history.events[event.seq] = event
    return history


async def find_request(js: JetStreamContext, subjects: Subjects, region: str, request_id: str,
                       tenant: str) -> ChatRequest | None:
    """The captured copy of `tenant`'s request `request_id` in `region`'s capture (the last attempt
    published there), or None. A request's subject names its tenant and id, so the server hands
    over that request's copies only (one per attempt, in any priority): whatever else the capture
    holds, an unknown id costs as little as a known one. Through a consumer, not a last-by-subject
    get, which finds nothing in a mirror of another region's capture."""
    found = None
    filter_subject = subjects.captured_copies_of_request(region, tenant, request_id)
    async with aclosing(captured_on(js, subjects, region, filter_subject)) as copies:
        async for msg in copies:
            try:
                request = decode(msg.data, ChatRequest)
            except BadMessage:
                continue
            if request.request_id == request_id and request.tenant == tenant:
                found = request
    return found
