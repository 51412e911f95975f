"""One intake for both doors: a validated chat (a websocket `chat` frame, or an OpenAI request
turned into one by edge/openai_wire.py) becomes a request on the bus, or a refusal that says why.

In order: the priority (the client's, else the tenant's most urgent) and whether the tenant may use
it; the region (the client's, else the one edge/routing.py chooses: home, a conversation's last,
overflow or failover); the edge's and the tenant's requests in flight; the sampling defaults;
admission (tokens per minute, the priority's estimated queue wait: edge/admission.py); then
publish, and follow it (edge/live.py). The request's identity is bound on every log line from then on.

A region a client names must be one the edge knows (edge/regions.py: its own, or one heard on the
bus, alive or recently dead); any other is `invalid_request` (param `region`, naming the known
ones) before anything is kept or published for it, so invented regions cost nothing.

A stage of a request with no live worker in the chosen region (routing chose it because no other
region takes new requests) is judged by how long ago it had one:
  - never, as far as this edge knows: refused at once (`unavailable`, retry after 2 s): nobody
    would serve it, and a region that is starting has its workers in seconds;
  - within `replacement_window_s` (REPLACEMENT_WINDOW_S, 120 s): a replacement is presumably
    starting (`grokstack up` and Kubernetes restart a dead worker; a vLLM worker takes about a
    minute to start). The request is accepted and waits in JetStream, which is what the queue is
    for: refusing it serves nobody sooner, since nothing is served until the replacement is up,
    and what was accepted first is served first then. Admission still holds the priority's queue
    budget, with the queue weighed at the speed the pool had (edge/queues.py): a backlog the pool
    could not clear is refused (`overloaded`), with a retry-after no shorter than the replacement's
    expected start (EXPECTED_START_S after the last worker was heard);
  - longer ago than the window: the replacement is not coming soon (crash loop, no capacity):
    refused (`unavailable`) with a retry-after of the expected start time, EXPECTED_START_S.
An accepted request that waits past `request_timeout_s` ends with a retryable `timeout`.

Each door only turns a `Refusal` into its own shape: an error frame, or OpenAI's error JSON with an
HTTP status and `Retry-After`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace

from bus.client import JobRejected
from bus import tracing
from bus.log_context import request_context
from bus.priorities import PRIORITIES, Priority
from bus.subjects import check_token
from edge import metrics
from edge.admission import Admission, Refused
from edge.config import EdgeConfig
from edge.gateway import Gateway
from edge.live import LiveRequest, LiveRequests, Overloaded
from edge.protocol import ChatFrame, sampling_of
from edge.routing import Route, Router
from edge.tenants import Tenant

log = structlog.get_logger("grokstack.edge")
_TRACER = tracing.tracer("grokstack.edge")

EXPECTED_START_S = 60.0  # a worker's start (its engine loading the model), as measured on CPU
REPLACEMENT_WINDOW_S = 2 * EXPECTED_START_S  # a stage gone longer has no replacement coming soon
NEVER_ALIVE_RETRY_S = 2.0


class Refusal(Exception):
    """A chat the edge does not put on the bus. `code` is one of edge/protocol.py's error codes;
    `param` names the field at fault; `retry_after_s` is set when a retry may succeed."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.retry_after_s = code, message, param, retry_after_s


@dataclass(frozen=True)
class Accepted:
    live: LiveRequest
    degraded_max_tokens: int | None  # max_tokens was capped to this (batch under load)
    # The queue wait admission judged it by (edge/admission.py): the doors tell the client, so
    # a bench can hold it against the wait the request then had (its final timings).
    estimated_wait_s: float = 0.0


class Intake:
    def __init__(self, config: EdgeConfig, gateway: Gateway, live: LiveRequests, admission: Admission,
                 router: Router) -> None:
        self.config = config
        self.gateway = gateway
        self.live = live
        self.admission = admission
        self.router = router
        self.replacement_window_s = REPLACEMENT_WINDOW_S
        self.expected_start_s = EXPECTED_START_S

    @asynccontextmanager
    async def accept(self, chat: ChatFrame, tenant: Tenant, trace_parent: otel_context.Context | None = None,
                     count_prompt: bool = False, **context: object) -> AsyncIterator[Accepted]:
        """The chat on the bus and followed, for as long as the caller stays in the block (its log
        lines carry the request's identity and `context`); Refusal when it is not accepted. Its
        trace goes on from `trace_parent` (a client's traceparent), or starts here. With
        `count_prompt`, its token events carry the prompt's token count (SamplingSpec)."""
        priority = self._priority(chat, tenant)
        route, replacement_in_s = self._route(chat, priority)
        region = route.region
        try:
            self.live.check_capacity(tenant.name, tenant.max_concurrent)
        except Overloaded as exc:
            raise self._refuse("too_many_requests", priority, f"{exc}; retry shortly", retry_after_s=1.0) from None
        request = self.gateway.client.new_request(
            list(chat.messages), sampling_of(chat, self.config, count_prompt), priority, region=region,
            conversation_id=chat.conversation_id, timeout_s=self.config.request_timeout_s, tenant=tenant.name,
            route=route.reason, prompt_format=chat.prompt_format)
        span = _TRACER.start_span("edge request", context=trace_parent, kind=trace.SpanKind.SERVER, attributes={
            "grokstack.request_id": request.request_id, "grokstack.region": region, "grokstack.priority": priority,
            "grokstack.tenant": tenant.name, "grokstack.route": route.reason,
            **{f"grokstack.{k}": str(v) for k, v in context.items()}})
        with request_context(request.request_id, region, priority, tenant=tenant.name, **context):
            try:
                try:
                    admitted = self.admission.admit(request, tenant, replacement_in_s)
                except Refused as exc:
                    log.info("request refused", code=exc.code, retry_after_s=exc.retry_after_s)
                    raise Refusal(exc.code, exc.message, retry_after_s=exc.retry_after_s) from None
                try:
                    live = await self.live.start(admitted.request, tenant.name, span)
                except JobRejected as exc:
                    log.warning("request not accepted", error=str(exc))
                    raise self._refuse("unavailable", priority, str(exc), retry_after_s=1.0) from None
            except BaseException as exc:  # not on the bus: its trace ends here
                span.set_status(trace.StatusCode.ERROR, exc.code if isinstance(exc, Refusal) else type(exc).__name__)
                span.end()
                raise
            self.admission.track(live, admitted)
            self.router.served(chat.conversation_id, region)
            metrics.observe_routed(region, route.reason)
            log.info("request accepted", max_tokens=admitted.request.sampling.max_tokens,
                     degraded=admitted.degraded_max_tokens is not None, route=route.reason,
                     ttft_estimate_s=round(route.ttft_s, 3), wait_estimate_s=admitted.estimated_wait_s)
            yield Accepted(live, admitted.degraded_max_tokens, admitted.estimated_wait_s)

    def _priority(self, chat: ChatFrame, tenant: Tenant) -> Priority:
        priority = chat.priority or tenant.default_priority
        if priority not in PRIORITIES:  # a header's value; a frame's field is typed already
            raise Refusal("invalid_request", f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}",
                          "priority")
        if priority not in tenant.priorities:
            raise Refusal("forbidden", f"tenant {tenant.name!r} may not use priority {priority!r}; allowed: "
                          f"{', '.join(tenant.priorities)}", "priority")
        return priority

    def _route(self, chat: ChatFrame, priority: Priority) -> tuple[Route, float]:
        """The route, and the seconds until a stage without a live worker there is expected to
        have one again (0 when every stage has one); Refusal as the docstring says."""
        regions = self.gateway.regions
        if chat.region:
            try:
                check_token(chat.region, "region")
            except ValueError as exc:
                raise Refusal("invalid_request", str(exc), "region") from None
            if not regions.knows(chat.region):  # before anything is kept for it
                raise Refusal("invalid_request", f"unknown region {chat.region!r}; known regions: "
                              f"{', '.join(regions.names())}", "region")
        route = self.router.choose(priority, chat.conversation_id, chat.region)
        down = [stage for stage, up in self.gateway.workers_alive(route.region).items() if not up]
        if not down:
            return route, 0.0
        gone = {stage: regions.stage_gone_s(route.region, stage) for stage in down}
        what = f"no {' or '.join(down)} worker of region {route.region!r} is alive"
        if any(seconds is None for seconds in gone.values()):
            raise self._refuse("unavailable", priority, what, param="region", retry_after_s=NEVER_ALIVE_RETRY_S)
        longest = max(s for s in gone.values() if s is not None)
        if longest > self.replacement_window_s:
            raise self._refuse("unavailable", priority, f"{what} (none for {longest:.0f} s); retry after "
                               f"{self.expected_start_s:g} s", param="region", retry_after_s=self.expected_start_s)
        log.debug("accepting while a replacement starts", region=route.region, stages=down, gone_s=round(longest, 1))
        return route, max(0.0, self.expected_start_s - longest)

    def _refuse(self, code: str, priority: Priority, message: str, param: str | None = None,
                retry_after_s: float | None = None) -> Refusal:
        metrics.observe_refused(code, priority)
        return Refusal(code, message, param, retry_after_s)
