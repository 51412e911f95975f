"""The OpenAI-compatible HTTP API of the edge node (aiohttp).

    POST /v1/chat/completions                   streaming (SSE) or one JSON response
    GET  /v1/chat/completions/{id}/stream       resume a stream: `Last-Event-ID: <seq>` and
                                                `X-Grokstack-Resume-Token: <token>`
    GET  /v1/models, /healthz, /readyz

Prometheus' /metrics is not here (request ids are its exemplars): the edge process serves it,
with /healthz and /readyz, on its metrics port (services/processes.py start_edge).

Every response to a chat request carries `X-Request-Id` and `X-Grokstack-Resume-Token`; every SSE
event carries `id: <seq>`, the request's event sequence number. A client that lost the
connection asks for the rest with the last id it saw (`Last-Event-ID`, or `?last_event_id=`: an
integer in [-1, MAX_SEQ]) and the token (the header, or `?resume_token=`), and gets exactly the
missed tokens, then the end (the final chunk even when its id is past the end). Without the
right token the answer is that of an unknown id (404 `unknown_request`), found without a lookup;
resumes are rate-limited per client address and tenant (429 `rate_limited`, Retry-After). A
client that disconnects detaches from its request; the request is cancelled through the pipeline
when nobody resumes it within `resume_grace_s`.
"""

from __future__ import annotations

import asyncio
import re
import time

import msgspec
import structlog
from aiohttp import web

from bus.log_context import request_context
from bus.messages import FinalEvent, TokenEvent
from bus.subjects import check_token
from edge.admission import retry_after_header
from edge.config import EdgeConfig
from edge.intake import Intake, Refusal
from edge.live import LiveRequest, LiveRequests
from edge.openai_wire import (
    Model,
    ModelList,
    completion,
    completion_id,
    error_body,
    final_chunks,
    info_of,
    param_of,
    parse_request,
    token_chunk,
)
from edge.protocol import MAX_SEQ, ChatFrame, FrameError, usage_frame
from edge.resume import HEADER as RESUME_HEADER
from edge.resume import ResumeGuard, ResumeRateLimited
from edge.tenants import ApiKeys, AuthError, Tenant

log = structlog.get_logger("grokstack.api")

PRIORITY_HEADER = "X-Grokstack-Priority"
REGION_HEADER = "X-Grokstack-Region"
DEGRADED_HEADER = "X-Grokstack-Degraded-Max-Tokens"
ESTIMATED_WAIT_HEADER = "X-Grokstack-Estimated-Wait"  # seconds: the queue wait admission judged it by
ROUTE_HEADER = "X-Grokstack-Route"  # in responses: why the region in X-Grokstack-Region (edge/routing.py)
_json = msgspec.json.Encoder()
_SEQ = re.compile(r"-?[0-9]{1,7}")  # ASCII digits only: int() also takes " 5", "1_0" and other scripts' digits


class ApiError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None, retry_after_s: int = 0) -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.retry_after_s = code, message, param, retry_after_s


def error_response(exc: ApiError) -> web.Response:
    status, body = error_body(exc.code, exc.message, exc.param)
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else {}
    return web.Response(status=status, body=_json.encode(body), content_type="application/json",
                        headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error, ours or aiohttp's (404, 405, 413), as OpenAI's error JSON."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(ApiError("frame_too_large", f"the body is too large: {exc.text}"))
    except web.HTTPMethodNotAllowed:
        return error_response(ApiError("method_not_allowed", f"{request.method} is not allowed on {request.path}"))
    except web.HTTPNotFound:
        return error_response(ApiError("not_found", f"no route {request.method} {request.path}"))


class OpenAIApi:
    def __init__(self, config: EdgeConfig, live: LiveRequests, keys: ApiKeys, intake: Intake,
                 guard: ResumeGuard) -> None:
        self.config = config
        self.guard = guard
        self.live = live
        self.intake = intake
        self.gateway = live.gateway
        self.keys = keys
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[openai_errors], client_max_size=self.config.max_frame_bytes)
        app.add_routes([
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/chat/completions/{request_id}/stream", self.resume),
            web.get("/v1/models", self.models),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
        ])
        return app

    async def start(self) -> int:
        # handler_cancellation: a client that goes away cancels its handler, which detaches it
        # from the request (and starts the grace period) at once.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.edge_host, self.config.api_port)
        await site.start()
        port = self._runner.addresses[0][1]
        log.info("openai api listening", url=f"http://{self.config.edge_host}:{port}/v1")
        return int(port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ plain endpoints

    async def healthz(self, request: web.Request) -> web.Response:
        ok, body = self.gateway.health()
        return web.Response(status=200 if ok else 503, text=body)

    async def readyz(self, request: web.Request) -> web.Response:
        ok, body = self.gateway.readiness()
        return web.Response(status=200 if ok else 503, text=body)

    async def models(self, request: web.Request) -> web.Response:
        self._tenant(request)
        body = ModelList("list", [Model(m, "model", 0, "grokstack") for m in self.gateway.models()])
        return web.Response(body=_json.encode(body), content_type="application/json")

    # ------------------------------------------------------------------ chat

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        tenant = self._tenant(request)
        if (request.content_length or 0) > self.config.max_frame_bytes:  # before reading it
            raise ApiError("frame_too_large", f"the body is {request.content_length} bytes; the limit is "
                           f"{self.config.max_frame_bytes}")
        try:
            body, frame = parse_request(await request.read(), self.config)
        except FrameError as exc:
            raise ApiError(exc.code, exc.message, param_of(exc.message)) from None
        if body.model not in self.gateway.models():
            raise ApiError("model_not_found", f"the model {body.model!r} does not exist; GET /v1/models lists "
                           "the models served", "model")
        chat = self._with_headers(request, frame)
        try:
            async with self.intake.accept(chat, tenant, api="openai", stream=body.stream) as accepted:
                live = accepted.live
                live.api_model = body.model
                live.include_usage = bool(body.stream_options and body.stream_options.include_usage)
                # A batch request's max_tokens capped under load says so (edge/admission.py).
                headers = {REGION_HEADER: live.region, ROUTE_HEADER: live.route,
                           RESUME_HEADER: self.guard.token(tenant.name, live.request_id)}
                if accepted.degraded_max_tokens is not None:
                    headers[DEGRADED_HEADER] = str(accepted.degraded_max_tokens)
                if accepted.estimated_wait_s is not None:
                    headers[ESTIMATED_WAIT_HEADER] = f"{accepted.estimated_wait_s:.3f}"
                if body.stream:
                    return await self._stream(request, live, -1, headers)
                return await self._complete(live, headers)
        except Refusal as refusal:
            retry = retry_after_header(refusal.retry_after_s) if refusal.retry_after_s is not None else 0
            raise ApiError(refusal.code, refusal.message, refusal.param, retry) from None

    def _with_headers(self, request: web.Request, frame: ChatFrame) -> ChatFrame:
        """The routing headers stand in for the body's fields, checked as those are (the intake
        checks whether the region exists)."""
        chat = msgspec.structs.replace(frame, priority=frame.priority or request.headers.get(PRIORITY_HEADER),
                                       region=frame.region or request.headers.get(REGION_HEADER))
        try:
            return msgspec.convert(msgspec.to_builtins(chat), ChatFrame)
        except msgspec.ValidationError as exc:
            name = "priority" if "$.priority" in str(exc) else "region"
            header = PRIORITY_HEADER if name == "priority" else REGION_HEADER
            raise ApiError("invalid_request", f"{name} (the body's field or {header}): {exc}", name) from None

    async def resume(self, request: web.Request) -> web.StreamResponse:
        tenant = self._tenant(request)
        request_id = request.match_info["request_id"].removeprefix("chatcmpl-")
        name = "Last-Event-ID" if "Last-Event-ID" in request.headers else "last_event_id"
        raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or "-1"
        if not _SEQ.fullmatch(raw) or not -1 <= int(raw) <= MAX_SEQ:
            raise ApiError("invalid_request", f"{name} must be an event sequence number, an integer from -1 "
                           f"to {MAX_SEQ}; got {raw[:32]!r}", name)
        last_seq = int(raw)
        try:
            check_token(request_id, "request id")
        except ValueError as exc:
            raise ApiError("invalid_request", str(exc), "request_id") from None
        token = request.headers.get(RESUME_HEADER) or request.query.get("resume_token")
        try:
            allowed = self.guard.admit(self.guard.address_bucket(request.remote or ""), tenant.name, request_id,
                                       token)
        except ResumeRateLimited as exc:
            raise ApiError("rate_limited", exc.message, retry_after_s=retry_after_header(exc.retry_after_s)) from None
        # A wrong token is answered as an unknown id, without looking anything up.
        live = await self.live.resumable(request_id, tenant.name) if allowed else None
        if live is None:
            raise ApiError("unknown_request", f"no request {request_id!r} to resume with this resume token "
                           "(unknown, another tenant's, older than the capture stream keeps, or not its token)")
        with request_context(live.request_id, live.request.region, live.request.priority, tenant=tenant.name,
                             api="openai"):
            log.info("request resumed", last_seq=last_seq)
            return await self._stream(request, live, last_seq, {RESUME_HEADER: token or ""})

    def _tenant(self, request: web.Request) -> Tenant:
        try:
            return self.keys.tenant_for(request.headers.get("Authorization"))
        except AuthError as exc:
            raise ApiError("unauthorized", str(exc)) from None

    async def _complete(self, live: LiveRequest, headers: dict[str, str] | None = None) -> web.Response:
        parts: list[str] = []
        async for event in self.live.follow(live):
            if isinstance(event, TokenEvent):
                parts.append(event.text)
            elif isinstance(event, FinalEvent):
                usage = usage_frame(event, live.ttft_ms, self._elapsed_ms(live), live.region, live.route)
                info = info_of(live.request_id, event, usage)
                body = completion(completion_id(live.request_id), int(live.request.created_at), live.api_model,
                                  "".join(parts), event, info)
                return web.Response(body=_json.encode(body), content_type="application/json",
                                    headers={"X-Request-Id": live.request_id, **(headers or {})})
            else:
                raise ApiError(event.code, event.message, retry_after_s=1 if event.retryable else 0)
        raise ApiError("internal", "the request ended without a final event")

    async def _stream(self, request: web.Request, live: LiveRequest, after_seq: int,
                      headers: dict[str, str] | None = None) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            "X-Request-Id": live.request_id, **(headers or {})})
        await response.prepare(request)
        cid, created = completion_id(live.request_id), int(live.request.created_at)
        try:
            async for event in self.live.follow(live, after_seq):
                if isinstance(event, TokenEvent):
                    await self._send(response, event.seq, token_chunk(cid, created, live.api_model, event))
                elif isinstance(event, FinalEvent):
                    usage = usage_frame(event, live.ttft_ms, self._elapsed_ms(live), live.region, live.route)
                    info = info_of(live.request_id, event, usage)
                    for chunk in final_chunks(cid, created, live.api_model, event, info, live.include_usage):
                        await self._send(response, event.seq, chunk)
                else:
                    await self._send(response, event.seq, error_body(event.code, event.message)[1])
            await self._write(response, b"data: [DONE]\n\n")
            await response.write_eof()
        except asyncio.TimeoutError:
            # The client stopped reading: drop it rather than let it hold memory and workers.
            log.warning("client too slow, dropping", request_id=live.request_id)
            await self.live.cancel(live, "client_too_slow")
            if request.transport is not None:
                request.transport.abort()  # close() would wait to send what it buffered: forever
        return response

    async def _send(self, response: web.StreamResponse, seq: int, payload: object) -> None:
        await self._write(response, b"id: %d\ndata: %s\n\n" % (seq, _json.encode(payload)))

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        await asyncio.wait_for(response.write(data), self.config.send_timeout_s)

    @staticmethod
    def _elapsed_ms(live: LiveRequest) -> float:
        return (time.monotonic() - live.started) * 1000

