"""Requests the edge holds, apart from the connections that asked for them.

A client's connection can drop mid-answer; the request goes on. Each request's events are kept
here in order (event `seq` n at index n) until it ends and for `resume_retention_s` after, so a
client that comes back with the request id, its resume token (edge/resume.py: checked at the
doors, before `resumable` looks anything up) and the last sequence number it saw gets exactly the
events it missed, then the rest: no repeat, no gap. A request that nobody follows for
`resume_grace_s` is cancelled through the pipeline, as is one its client cancels.

A request this edge does not hold may have been accepted by another edge that died (or the
client reconnected elsewhere): it is adopted from the capture stream, where the request and all
its events are stored, then followed live like one of ours. The request names its tenant; only
a client of the same tenant may resume it.

A request whose region dies mid-answer (its beats stop, edge/regions.py) is taken over in the
region edge/routing.py picks: published there as its next attempt, with the tokens the client
was sent as part of the prompt, going on from the next sequence number. The old region is told
to stop it (heard if it was only cut off); its late events are dropped (bus/ordering.py). While
a request waits in a live region's queue, only that region's liveness decides: no "no token yet"
timeout moves it.

Websocket connections and HTTP/SSE responses are both just followers of a `LiveRequest`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import structlog

import msgspec
from opentelemetry import trace

from bus import tracing
from bus.messages import ChatRequest, Continuation, ErrorEvent, Event, FinalEvent, TokenEvent, Usage
from bus.client import Job, JobRejected
from edge.gateway import Gateway
from edge import metrics
from edge.config import EdgeConfig
from edge.routing import Router

log = structlog.get_logger("grokstack.edge")
_TRACER = tracing.tracer("grokstack.edge")


CANCEL_MESSAGES = {"client_cancelled": "cancelled by the client",
                   "client_gone": "the client did not come back within the grace period",
                   "choice_failed": "another choice of the same body failed",
                   "choices_left": "the client left before the choices of its body ended"}


class Overloaded(RuntimeError):
    """The edge (or the tenant) has as many requests in flight as it may; retry shortly."""


@dataclass
class LiveRequest:
    request: ChatRequest
    tenant: str
    started: float = field(default_factory=time.monotonic)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    # False for a request adopted from the capture: its earlier events arrive here in one burst,
    # so their timing says nothing about time to first token or between tokens.
    timed: bool = True
    events: list[Event] = field(default_factory=list)
    followers: int = 0
    finished: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    api_model: str = ""  # what an OpenAI client asked for, to name it in resumed chunks
    include_usage: bool = False
    # Adopted from another region's capture (its client's edge died with its region): goes on
    # here as a later attempt as soon as its captured events are in.
    orphaned: bool = False
    _grace: asyncio.TimerHandle | None = None
    _pump: asyncio.Task | None = None
    # Its trace (bus/tracing.py): the edge's span, ended with the request, and the span of the
    # region hop it is on when another region serves it (ended then, or at the next hop).
    span: trace.Span = trace.INVALID_SPAN
    hop: trace.Span | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def region(self) -> str:
        """Where it is served."""
        return self.request.region

    @property
    def route(self) -> str:
        return self.request.route

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_at - self.started) * 1000 if self.first_token_at else 0.0

    def append(self, event: Event) -> None:
        if self.finished:
            return
        self._observe(event, time.monotonic())
        self.events.append(event)
        self.finished = isinstance(event, (FinalEvent, ErrorEvent))
        if self.finished:
            self._end_trace(event)
        self._changed.set()

    def _end_trace(self, event: Event) -> None:
        if isinstance(event, ErrorEvent):
            self.span.set_status(trace.StatusCode.ERROR, event.code)
        else:
            self.span.set_attribute("grokstack.finish_reason", event.finish_reason)
        if self.hop is not None:
            self.hop.end()
        self.span.end()

    def _observe(self, event: Event, now: float) -> None:
        """The client-side latencies and token counts of this request, into the metrics."""
        region, priority, rid = self.request.region, self.request.priority, self.request_id
        if isinstance(event, TokenEvent):
            if not self.first_token_at:
                self.first_token_at = now
                self.span.add_event("first token")
                if self.timed:
                    metrics.observe_first_token(region, priority, now - self.started, rid)
            elif self.timed:
                metrics.observe_token_gap(region, priority, now - self.last_token_at, len(event.token_ids), rid)
            self.last_token_at = now
        elif isinstance(event, FinalEvent):
            metrics.observe_request_end(region, priority, now - self.started, event.finish_reason, rid,
                                        event.usage.prompt_tokens, event.usage.completion_tokens)
        else:
            metrics.observe_request_end(region, priority, now - self.started, event.code, rid)

    def end(self, code: str, message: str, retryable: bool = False) -> None:
        """Finish with an error event of our own (timeout, cancel), numbered in sequence."""
        self.append(ErrorEvent(request_id=self.request_id, seq=len(self.events), code=code,
                               message=message, retryable=retryable))

    def when_ended(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the request's events stop coming (finished, timed out or stopped)."""
        if self._pump is not None:
            self._pump.add_done_callback(lambda _: callback())

    async def changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()


class LiveRequests:
    def __init__(self, config: EdgeConfig, gateway: Gateway, router: Router) -> None:
        self.config = config
        self.gateway = gateway
        self.router = router
        self._live: dict[str, LiveRequest] = {}
        self._pumps: set[asyncio.Task] = set()
        self.per_tenant: Counter[str] = Counter()  # requests in flight (not finished)
        self._adopting: dict[str, asyncio.Task] = {}  # request id -> its adoption under way

    def get(self, request_id: str) -> LiveRequest | None:
        return self._live.get(request_id)

    @property
    def in_flight(self) -> int:
        return sum(self.per_tenant.values())

    def check_capacity(self, tenant: str, tenant_limit: int, more: int = 1) -> None:
        """Overloaded unless there is room for `more` requests of `tenant`."""
        if self.in_flight + more > self.config.max_inflight_per_edge:
            raise Overloaded(f"this edge has {self.in_flight} requests in flight, its limit")
        if self.per_tenant[tenant] + more > tenant_limit:
            raise Overloaded(f"tenant {tenant!r} has {self.per_tenant[tenant]} requests in flight, "
                             "its limit")

    async def start(self, request: ChatRequest, tenant: str, span: trace.Span = trace.INVALID_SPAN) -> LiveRequest:
        """Publish the request and start collecting its events, as part of the edge's `span`
        (which it ends with the request). Raises JobRejected."""
        started = time.monotonic()  # its clocks include the publish (a round trip, to another region)
        hop = self._hop(span, self.gateway.region, request.region, request.route) \
            if request.region != self.gateway.region else None
        with trace.use_span(hop or span, end_on_exit=False):  # the context the request carries
            try:
                job = await self.gateway.client.submit(request, self.config.request_timeout_s)
            except BaseException:
                if hop is not None:
                    hop.end()
                raise
        live = LiveRequest(request, tenant, started=started, span=span, hop=hop)
        self._track(live, job)
        return live

    @staticmethod
    def _hop(span: trace.Span, home: str, region: str, why: str) -> trace.Span:
        """A span for the request's stay in another region: what that region does is its child."""
        return _TRACER.start_span("region hop", context=trace.set_span_in_context(span),
                                  kind=trace.SpanKind.PRODUCER,
                                  attributes={"grokstack.from_region": home, "grokstack.to_region": region,
                                              "grokstack.route": why})

    async def resumable(self, request_id: str, tenant: str) -> LiveRequest | None:
        """The tenant's request `request_id`, held here or adopted from the capture; None when
        there is none (or it is another tenant's)."""
        live = self._live.get(request_id)
        if live is None:
            adoption = self._adopting.get(request_id)
            if adoption is None:  # two resumes at once adopt it once
                adoption = self._adopting[request_id] = asyncio.create_task(self._adopt(request_id, tenant))
                adoption.add_done_callback(lambda _: self._adopting.pop(request_id, None))
            await asyncio.shield(adoption)
            live = self._live.get(request_id)
        return live if live is not None and live.tenant == tenant else None

    async def follow(self, live: LiveRequest, after_seq: int = -1) -> AsyncIterator[Event]:
        """The request's events after `after_seq`, as they come, until its last one, which comes
        even when `after_seq` is past it (a stream always ends with its final event). While no
        one follows an unfinished request, its grace period runs."""
        self._attach(live)
        try:
            # Never below 0: a negative index would replay from the end, out of order.
            next_seq = max(after_seq + 1, 0)
            ended = False
            while True:
                while next_seq < len(live.events):
                    event = live.events[next_seq]
                    next_seq += 1
                    ended = isinstance(event, (FinalEvent, ErrorEvent))
                    yield event
                if live.finished:
                    if not ended and live.events:  # asked for events after its end: it ended
                        yield live.events[-1]
                    return
                await live.changed()
        finally:
            self._detach(live)

    async def follow_all(self, lives: list[LiveRequest], after_seq: int = -1) -> AsyncIterator[tuple[int, Event]]:
        """The events of several requests (the `n` choices of one body), each with the request's
        index in `lives`, in the order they come; each request's in its own order."""
        if len(lives) == 1:
            async for event in self.follow(lives[0], after_seq):
                yield 0, event
            return
        queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

        async def forward(index: int, live: LiveRequest) -> None:
            try:
                async for event in self.follow(live, after_seq):
                    queue.put_nowait((index, event))
                queue.put_nowait((index, None))
            except BaseException as exc:  # to the reader below (which never waits for a follower gone)
                queue.put_nowait((index, exc))
                raise

        tasks = [asyncio.create_task(forward(i, live)) for i, live in enumerate(lives)]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def cancel(self, live: LiveRequest, reason: str) -> None:
        if live.finished:
            return
        live.end("cancelled", CANCEL_MESSAGES.get(reason, f"cancelled: {reason}"))
        if live._pump is not None:
            live._pump.cancel()
        await self.gateway.client.cancel(live.request_id, live.request.region, reason)

    async def stop(self) -> None:
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    # ------------------------------------------------------------------ internals

    def _track(self, live: LiveRequest, job: Job) -> None:
        self._live[live.request_id] = live
        self.per_tenant[live.tenant] += 1
        task = live._pump = asyncio.create_task(self._pump(live, job))
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)
        metrics.stream_started()  # in flight until its pump ends (finished, timed out or stopped)
        task.add_done_callback(lambda _: metrics.stream_ended())
        self._start_grace(live)  # until its first follower comes

    async def _adopt(self, request_id: str, tenant: str) -> None:
        found = await self.gateway.adopt(request_id, tenant)  # looked up under its tenant only
        if found is None:
            return
        request, job = found
        if request.tenant != tenant:
            self.gateway.client.forget(request_id)
            return
        # Its clocks run from when it was created, as they did on the edge that accepted it.
        age_s = max(0.0, time.time() - request.created_at) if request.created_at else 0.0
        live = LiveRequest(request, tenant, started=time.monotonic() - age_s, api_model=self.gateway.model_id,
                           timed=False)
        # Its events went to an edge of another region, gone with it (its client came here):
        # nobody hears that attempt's events, so it goes on from what the mirror holds.
        live.orphaned = self.gateway.subjects.event_region(request.reply_to) != self.gateway.region
        self._track(live, job)
        log.info("request adopted from the capture", request_id=request_id, reply_to=request.reply_to,
                 age_s=round(age_s, 3))

    def _attach(self, live: LiveRequest) -> None:
        live.followers += 1
        if live._grace is not None:
            live._grace.cancel()
            live._grace = None

    def _detach(self, live: LiveRequest) -> None:
        live.followers -= 1
        if live.followers == 0 and not live.finished:
            metrics.observe_client_disconnect()
        self._start_grace(live)

    def _start_grace(self, live: LiveRequest) -> None:
        if live.followers == 0 and not live.finished and live._grace is None:
            live._grace = asyncio.get_running_loop().call_later(
                self.config.resume_grace_s, lambda: asyncio.create_task(self._abandoned(live)))

    async def _abandoned(self, live: LiveRequest) -> None:
        live._grace = None
        if live.followers == 0 and not live.finished:
            log.info("client gone past the grace period, cancelling", request_id=live.request_id,
                     grace_s=self.config.resume_grace_s)
            await self.cancel(live, "client_gone")

    async def _pump(self, live: LiveRequest, job: Job) -> None:
        deadline = live.started + self.config.request_timeout_s
        try:
            while not live.finished:
                left = deadline - time.monotonic()
                try:
                    # Woken twice a beat period to look at the serving region's liveness.
                    event = await job.next(timeout=max(0.0, min(left, self.config.region_beat_s / 2)))
                except asyncio.TimeoutError:
                    if left > self.config.region_beat_s / 2:
                        await self._take_over_if_dead(live, job)
                        continue
                    live.end("timeout", f"no answer within {self.config.request_timeout_s:.0f} s",
                             retryable=True)
                    await self.gateway.client.cancel(live.request_id, live.request.region, "timeout")
                    break
                if isinstance(event, ErrorEvent) and event.code == "stream_gap":
                    await self.gateway.client.cancel(live.request_id, live.request.region, "stream_gap")
                live.append(event)
        finally:
            if not live.finished:  # stopped without an end (the edge stopping): its trace ends here
                live.span.set_status(trace.StatusCode.ERROR, "edge stopped")
                if live.hop is not None:
                    live.hop.end()
                live.span.end()
            self.gateway.client.forget(live.request_id)
            self.per_tenant[live.tenant] -= 1
            if self.per_tenant[live.tenant] <= 0:
                del self.per_tenant[live.tenant]
            # Kept a while for clients that come back after the end (the answer is still theirs).
            asyncio.get_running_loop().call_later(self.config.resume_retention_s,
                                                  self._live.pop, live.request_id, None)

    async def _take_over_if_dead(self, live: LiveRequest, job: Job) -> None:
        """The region serving `live` died (or was cut off), or its client's edge did with its own
        region: go on in the best region alive."""
        regions, old = self.gateway.regions, live.region
        if not (regions.dead(old) or live.orphaned):
            return
        route = self.router.choose(live.request.priority, live.request.conversation_id)
        if (route.region == old and not live.orphaned) or not regions.takes_new(route.region, self.router.model_id):
            return  # nowhere to go yet: look again next beat
        tokens = [t for e in live.events if isinstance(e, TokenEvent) for t in e.token_ids]
        next_seq = len(live.events)
        request = live.request
        # max_tokens of a continued request already counts what its continuation holds
        asked = request.sampling.max_tokens + (len(request.continuation.token_ids) if request.continuation else 0)
        left = asked - len(tokens)
        if left <= 0:  # the region died between the last token and the final event
            live.append(FinalEvent(request_id=live.request_id, seq=next_seq, finish_reason="length",
                                   usage=Usage(prompt_tokens=0, cached_prompt_tokens=0, completion_tokens=len(tokens)),
                                   attempt=request.attempt))
            return
        successor = msgspec.structs.replace(
            request, region=route.region, route="failover", attempt=request.attempt + 1,
            continuation=Continuation(token_ids=tokens, next_seq=next_seq), created_at=time.time(),
            sampling=msgspec.structs.replace(request.sampling, max_tokens=left,
                                             min_tokens=max(0, request.sampling.min_tokens - len(tokens))),
            reply_to=self.gateway.client.reply_to(live.request_id))  # here, whoever asked first
        cause = "client_moved" if live.orphaned else "region_dead"
        detected_s = regions.silent_for(old)
        hop = self._hop(live.span, old, route.region, cause)
        try:
            with trace.use_span(hop, end_on_exit=False):
                await self.gateway.client.take_over(job, successor)
        except BaseException as exc:
            hop.set_status(trace.StatusCode.ERROR, "not taken")
            hop.end()
            if not isinstance(exc, JobRejected):
                raise
            log.warning("request not taken over yet", error=str(exc), region=route.region)
            return
        if live.hop is not None:
            live.hop.end()
        live.hop = hop
        live.request = successor
        live.orphaned = False
        # heard if the old region was only cut off; only the old attempt: the new one may run there too
        await self.gateway.client.stop_work(live.request_id, old, "superseded", below_attempt=successor.attempt)
        metrics.observe_takeover(old, route.region, cause, detected_s)
        log.info("request taken over by another region", request_id=live.request_id, dead_region=old,
                 region=route.region, attempt=successor.attempt, tokens_sent=len(tokens), next_seq=next_seq,
                 cause=cause, detected_after_s=round(detected_s, 3))
