"""One intake for both doors: a validated chat (a websocket `chat` frame, or an OpenAI request
turned into one by edge/openai_wire.py) becomes a request on the bus, or a refusal that says why.

In order: the priority (the client's, else the tenant's most urgent) and whether the tenant may use
it; the region (the client's, else the one edge/routing.py chooses: home, a conversation's last,
overflow or failover), which must have a live worker for every stage of a request, so a request
nobody would serve is refused at once instead of waiting for its timeout;
the edge's and the tenant's requests in flight; the sampling defaults; admission (tokens per minute,
the priority's estimated queue wait: edge/admission.py); then publish, and follow it
(edge/live.py). The request's identity is bound on every log line from then on.

Each door only turns a `Refusal` into its own shape: an error frame, or OpenAI's error JSON with an
HTTP status and `Retry-After`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import structlog

from bus.client import JobRejected
from bus.log_context import request_context
from bus.messages import SamplingSpec
from bus.priorities import PRIORITIES, Priority
from bus.subjects import check_token
from edge import metrics
from edge.admission import Admission, Refused
from edge.config import EdgeConfig
from edge.gateway import Gateway
from edge.live import LiveRequest, LiveRequests, Overloaded
from edge.protocol import ChatFrame, stop_list
from edge.routing import Route, Router
from edge.tenants import Tenant

log = structlog.get_logger("grokstack.edge")


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


class Intake:
    def __init__(self, config: EdgeConfig, gateway: Gateway, live: LiveRequests, admission: Admission,
                 router: Router) -> None:
        self.config = config
        self.gateway = gateway
        self.live = live
        self.admission = admission
        self.router = router

    @asynccontextmanager
    async def accept(self, chat: ChatFrame, tenant: Tenant, **context: object) -> AsyncIterator[Accepted]:
        """The chat on the bus and followed, for as long as the caller stays in the block (its log
        lines carry the request's identity and `context`); Refusal when it is not accepted."""
        priority = self._priority(chat, tenant)
        route = self._route(chat, priority)
        region = route.region
        try:
            self.live.check_capacity(tenant.name, tenant.max_concurrent)
        except Overloaded as exc:
            raise self._refuse("too_many_requests", priority, f"{exc}; retry shortly", retry_after_s=1.0) from None
        sampling = SamplingSpec(max_tokens=chat.max_tokens or self.config.default_max_tokens,
                                temperature=chat.temperature, top_p=chat.top_p, stop=stop_list(chat), seed=chat.seed)
        request = self.gateway.client.new_request(
            list(chat.messages), sampling, priority, region=region, conversation_id=chat.conversation_id,
            timeout_s=self.config.request_timeout_s, tenant=tenant.name, route=route.reason)
        with request_context(request.request_id, region, priority, tenant=tenant.name, **context):
            try:
                admitted = self.admission.admit(request, tenant)
            except Refused as exc:
                log.info("request refused", code=exc.code, retry_after_s=exc.retry_after_s)
                raise Refusal(exc.code, exc.message, retry_after_s=exc.retry_after_s) from None
            try:
                live = await self.live.start(admitted.request, tenant.name)
            except JobRejected as exc:
                log.warning("request not accepted", error=str(exc))
                raise self._refuse("unavailable", priority, str(exc), retry_after_s=1.0) from None
            self.admission.track(live, admitted)
            self.router.served(chat.conversation_id, region)
            metrics.observe_routed(region, route.reason)
            log.info("request accepted", max_tokens=admitted.request.sampling.max_tokens,
                     degraded=admitted.degraded_max_tokens is not None, route=route.reason,
                     ttft_estimate_s=round(route.ttft_s, 3))
            yield Accepted(live, admitted.degraded_max_tokens)

    def _priority(self, chat: ChatFrame, tenant: Tenant) -> Priority:
        priority = chat.priority or tenant.default_priority
        if priority not in PRIORITIES:  # a header's value; a frame's field is typed already
            raise Refusal("invalid_request", f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}",
                          "priority")
        if priority not in tenant.priorities:
            raise Refusal("forbidden", f"tenant {tenant.name!r} may not use priority {priority!r}; allowed: "
                          f"{', '.join(tenant.priorities)}", "priority")
        return priority

    def _route(self, chat: ChatFrame, priority: Priority) -> Route:
        if chat.region:
            try:
                check_token(chat.region, "region")
            except ValueError as exc:
                raise Refusal("invalid_request", str(exc), "region") from None
        route = self.router.choose(priority, chat.conversation_id, chat.region)
        down = [stage for stage, up in self.gateway.workers_alive(route.region).items() if not up]
        if down:
            raise self._refuse("unavailable", priority, f"no {' or '.join(down)} worker of region "
                               f"{route.region!r} is alive", param="region", retry_after_s=2.0)
        return route

    def _refuse(self, code: str, priority: Priority, message: str, param: str | None = None,
                retry_after_s: float | None = None) -> Refusal:
        metrics.observe_refused(code, priority)
        return Refusal(code, message, param, retry_after_s)
