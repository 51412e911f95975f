"""The OpenAI-compatible HTTP API of the edge node (aiohttp), on par with what vLLM serves for
text generation, so that vLLM's clients (its benchmark, the openai SDK, LangChain, LiteLLM,
lm-eval) work unchanged:

    POST /v1/chat/completions                   streaming (SSE) or one JSON response
    POST /v1/completions                        the same for a plain text prompt (no chat template)
    GET  /v1/chat/completions/{id}/stream       resume a stream: `Last-Event-ID: <seq>` and
    GET  /v1/completions/{id}/stream            `X-Grokstack-Resume-Token: <token>`
    GET  /v1/models
    POST /tokenize, /detokenize                 the served model's tokenizer (edge/tokenizer.py)
    GET  /health, /version, /openapi.json       (the document: edge/openapi.py, from the routes)
    GET  /healthz, /readyz

Bodies take every field vLLM takes (edge/openai_wire.py; the answers: edge/openai_responses.py):
what is served goes to vLLM, what vLLM knows but this server cannot honour is a 400 naming it, and
a field no one knows is ignored, logged once and counted (grokstack_openai_ignored_fields_total),
as vLLM does.

Prometheus' /metrics is not here (request ids are its exemplars): the edge process serves it,
with /healthz and /readyz, on its metrics port (services/processes.py start_edge).

Every response to a generation request carries `X-Request-Id` and `X-Grokstack-Resume-Token`.
A body asking for `n` > 1 choices is n requests (choice i sampled with seed + i, as vLLM's
parallel sampling), streamed or answered together, its usage their prompt once and their
completions summed; it is not resumable (no token, no ids) and is cancelled when its client leaves.
An SSE event is `data: <json>` alone, as vLLM streams it (clients such as vLLM's benchmark read
an event as one data line and fail on any other field), unless the client says it reads SSE
(`Accept: text/event-stream`, as EventSource does) or resumes: then each event is `data: <json>`
followed by `id: <seq>`, the request's event sequence number. Without ids the seq of a content
chunk is its place among them (from 0: events are numbered in order, one per token event). A
client that lost the connection asks for the rest with the last seq it saw (`Last-Event-ID`, or
`?last_event_id=`: an integer in [-1, MAX_SEQ]) and the token (the header, or `?resume_token=`),
and gets exactly the missed tokens, then the end (the final chunk even when its id is past the
end). Without the right token the answer is that of an unknown id (404 `unknown_request`), found
without a lookup; resumes are rate-limited per client address and tenant (429 `rate_limited`,
Retry-After). A client that disconnects detaches from its request; the request is cancelled
through the pipeline when nobody resumes it within `resume_grace_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import structlog
from aiohttp import web

from bus import tracing
from bus.log_context import request_context
from bus.messages import FinalEvent, TokenEvent
from bus.subjects import check_token
from edge.admission import retry_after_header
from edge.config import EdgeConfig
from edge.intake import Intake, Refusal
from edge.live import LiveRequest, LiveRequests, Overloaded
from edge import metrics
from edge.openai_responses import (
    Answer,
    ChatCompletion,
    ChatCompletionChunk,
    DetokenizeResponse,
    GrokstackInfo,
    Model,
    ModelList,
    RunningUsage,
    StreamEnd,
    TextCompletion,
    TextCompletionChunk,
    TokenizeResponse,
    Version,
    error_body,
    info_of,
    package_version,
    param_of,
    shape_of,
)
from edge.openai_wire import (
    AnyRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    IgnoredFields,
    TokenizeRequest,
    chat_messages,
    choice_frames,
    continuous_usage,
    parse_request,
)
from edge.protocol import MAX_SEQ, ChatFrame, FrameError, usage_frame
from edge.resume import HEADER as RESUME_HEADER
from edge.resume import ResumeGuard, ResumeRateLimited
from edge.openapi import document, operation
from edge.tenants import ApiKeys, AuthError, Tenant
from edge.tokenizer import Tokenizer, TokenizerUnavailable

log = structlog.get_logger("grokstack.api")

PRIORITY_HEADER = "X-Grokstack-Priority"
REGION_HEADER = "X-Grokstack-Region"
DEGRADED_HEADER = "X-Grokstack-Degraded-Max-Tokens"
ESTIMATED_WAIT_HEADER = "X-Grokstack-Estimated-Wait"  # seconds: the queue wait admission judged it by
ROUTE_HEADER = "X-Grokstack-Route"  # in responses: why the region in X-Grokstack-Region (edge/routing.py)
_json = msgspec.json.Encoder()
T = TypeVar("T")
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


# The routes whose answers are counted as requests (grokstack_requests_total): generation, not probes.
COUNTED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/chat/completions/{request_id}/stream",
                     "/v1/completions/{request_id}/stream"})


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error, ours or aiohttp's (404, 405, 413), as OpenAI's error JSON; each generation
    request counted by status and error type, and each refusal logged with its reason."""
    error: ApiError | None = None
    try:
        response = await handler(request)
    except ApiError as exc:
        error = exc
    except web.HTTPRequestEntityTooLarge as exc:
        error = ApiError("frame_too_large", f"the body is too large: {exc.text}")
    except web.HTTPMethodNotAllowed:
        error = ApiError("method_not_allowed", f"{request.method} is not allowed on {request.path}")
    except web.HTTPNotFound:
        error = ApiError("not_found", f"no route {request.method} {request.path}")
    except TokenizerUnavailable as exc:
        error = ApiError("unavailable", str(exc))
    if error is not None:
        response = error_response(error)
        # 4xx at info: the client's doing, with what it was told; 5xx: ours
        (log.info if response.status < 500 else log.warning)(
            "request answered with an error", status=response.status, code=error.code, param=error.param,
            reason=error.message[:512], path=request.path[:256])
    route = request.match_info.route.resource
    if route is not None and route.canonical in COUNTED:
        metrics.observe_request("openai", response.status, error.code if error else "")
    return response


@dataclass(frozen=True)
class ServedModel:
    """What /v1/models says of the model this edge serves, as vLLM's model card does."""
    id: str
    root: str = ""  # what it was loaded from (a folder or a hub id): vLLM's clients load its tokenizer
    max_model_len: int = 0


class OpenAIApi:
    def __init__(self, config: EdgeConfig, live: LiveRequests, keys: ApiKeys, intake: Intake,
                 guard: ResumeGuard, served: ServedModel | None = None, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.guard = guard
        self.live = live
        self.intake = intake
        self.gateway = live.gateway
        self.keys = keys
        self.served = served or ServedModel(self.gateway.model_id)
        self.tokenizer = tokenizer
        self.ignored = IgnoredFields()
        self._runner: web.AppRunner | None = None

    def routes(self) -> list[web.RouteDef]:
        """Every route, with the handler that serves it: edge/openapi.py writes the document from
        these and the handlers' declared bodies, so the two cannot drift apart."""
        return [
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.get("/v1/chat/completions/{request_id}/stream", self.resume),
            web.get("/v1/completions/{request_id}/stream", self.resume),
            web.get("/v1/models", self.models),
            web.post("/tokenize", self.tokenize),
            web.post("/detokenize", self.detokenize),
            web.get("/health", self.health),
            web.get("/version", self.version),
            web.get("/openapi.json", self.openapi),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
        ]

    @classmethod
    def route_table(cls) -> list[web.RouteDef]:
        """The routes with the class's own functions as handlers: what the OpenAPI document is
        written from without a running edge (`grokstack openapi`, its test)."""
        return cls.routes(cls)  # type: ignore[arg-type]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[openai_errors], client_max_size=self.config.max_frame_bytes)
        app.add_routes(self.routes())
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

    @operation("Liveness of the edge process (its bus client)", text=True, auth=False)
    async def healthz(self, request: web.Request) -> web.Response:
        ok, body = self.gateway.health()
        return web.Response(status=200 if ok else 503, text=body)

    @operation("Readiness: the bus is connected; which stages have live workers", text=True, auth=False)
    async def readyz(self, request: web.Request) -> web.Response:
        ok, body = self.gateway.readiness()
        return web.Response(status=200 if ok else 503, text=body)

    @operation("vLLM's health probe: 200, empty, while the edge can serve", auth=False)
    async def health(self, request: web.Request) -> web.Response:
        """vLLM's: 200 with an empty body while it can serve (here: the bus client lives)."""
        ok, _ = self.gateway.health()
        return web.Response(status=200 if ok else 503)

    @operation("The server's version", returns=Version, auth=False)
    async def version(self, request: web.Request) -> web.Response:
        return _ok(Version(version=package_version()))

    @operation("This document", auth=False)
    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=_json.encode(document(self.routes())), content_type="application/json")

    @operation("The models served", returns=ModelList)
    async def models(self, request: web.Request) -> web.Response:
        self._tenant(request)
        s = self.served
        body = ModelList("list", [Model(m, "model", 0, "grokstack", s.root or m if m == s.id else m, None,
                                        s.max_model_len) for m in self.gateway.models()])
        return _ok(body)

    # ------------------------------------------------------------------ tokenizer

    @operation("A prompt's tokens, or those of messages under the chat template", body=TokenizeRequest,
               returns=TokenizeResponse)
    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: a prompt's tokens, or those of messages under the chat template."""
        self._tenant(request)
        body = self._tokenizer_model(await self._body(request, TokenizeRequest))
        if (body.prompt is None) == (body.messages is None):
            raise ApiError("invalid_request", "give either prompt or messages", "prompt")
        tokenizer = self._tokenizer()
        if body.messages is not None:
            try:
                messages = chat_messages(body.messages, self.config)
            except FrameError as exc:
                raise ApiError(exc.code, exc.message, "messages") from None
            tokens = await tokenizer.render_chat(messages, body.add_generation_prompt is not False)
        else:
            if len(body.prompt or "") > self.config.max_prompt_chars:
                raise ApiError("invalid_request", f"the prompt holds {len(body.prompt or '')} characters; the "
                               f"limit is {self.config.max_prompt_chars}", "prompt")
            tokens = await tokenizer.tokenize(body.prompt or "", body.add_special_tokens is not False)
        strs = await tokenizer.token_strings(tokens) if body.return_token_strs else None
        return _ok(TokenizeResponse(count=len(tokens), max_model_len=self.served.max_model_len, tokens=tokens,
                                    token_strs=strs))

    @operation("The text of tokens", body=DetokenizeRequest, returns=DetokenizeResponse)
    async def detokenize(self, request: web.Request) -> web.Response:
        self._tenant(request)
        body = self._tokenizer_model(await self._body(request, DetokenizeRequest))
        try:
            return _ok(DetokenizeResponse(prompt=await self._tokenizer().detokenize(body.tokens)))
        except ValueError as exc:
            raise ApiError("invalid_request", str(exc), "tokens") from None

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ApiError("unavailable", "this edge has no tokenizer (the served model's folder or hub id is not "
                           "configured)")
        return self.tokenizer

    async def _read_bounded(self, request: web.Request) -> bytes:
        """The body, refused by its declared length before it is read (aiohttp's client_max_size
        bounds one sent without a length)."""
        if (request.content_length or 0) > self.config.max_frame_bytes:
            raise ApiError("frame_too_large", f"the body is {request.content_length} bytes; the limit is "
                           f"{self.config.max_frame_bytes}")
        return await request.read()

    async def _body(self, request: web.Request, kind: type[T]) -> T:
        raw = await self._read_bounded(request)
        try:
            return msgspec.json.decode(raw, type=kind)
        except msgspec.ValidationError as exc:
            raise ApiError("invalid_request", str(exc), param_of(str(exc))) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ApiError("invalid_json", f"the body is not valid JSON: {exc}") from None

    def _model_checked(self, body: T) -> T:
        model = getattr(body, "model", None)
        if model is not None and model not in self.gateway.models():
            raise ApiError("model_not_found", f"the model {model!r} does not exist; GET /v1/models lists "
                           "the models served", "model")
        return body

    def _tokenizer_model(self, body: T) -> T:
        """The edge holds the tokenizer of the model it is configured with, and no other's."""
        model = getattr(body, "model", None)
        if model is not None and model != self.served.id:
            raise ApiError("model_not_found", f"this edge tokenizes for {self.served.id!r} only, not {model!r}",
                           "model")
        return body

    # ------------------------------------------------------------------ generation

    @operation("A chat completion", body=ChatCompletionRequest, returns=ChatCompletion,
               streams=ChatCompletionChunk)
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, ChatCompletionRequest)

    @operation("A completion of a text prompt", body=CompletionRequest, returns=TextCompletion,
               streams=TextCompletionChunk)
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CompletionRequest)

    async def _generate(self, request: web.Request, kind: type[AnyRequest]) -> web.StreamResponse:
        tenant = self._tenant(request)
        raw = await self._read_bounded(request)
        try:
            body, frame, ignored = parse_request(raw, self.config, kind)
        except FrameError as exc:
            raise ApiError(exc.code, exc.message, exc.param or param_of(exc.message)) from None
        self._note_ignored(ignored)
        self._model_checked(body)
        chat = self._with_headers(request, frame)
        n = body.n or 1
        if n > 1:  # room for all the choices, or none is published
            try:
                self.live.check_capacity(tenant.name, tenant.max_concurrent, more=n)
            except Overloaded as exc:
                raise ApiError("too_many_requests", f"{exc} (n = {n} asks for {n}); retry shortly",
                               retry_after_s=1) from None
        lives: list[LiveRequest] = []
        async with contextlib.AsyncExitStack() as held:
            try:
                admitted = []
                for choice in choice_frames(chat, n):  # each choice a request of its own
                    # a client's own trace (W3C traceparent) goes on through the stack
                    accepted = await held.enter_async_context(self.intake.accept(
                        choice, tenant, tracing.context_of(request.headers), count_prompt=continuous_usage(body),
                        api="openai", stream=bool(body.stream)))
                    admitted.append(accepted)
                    lives.append(accepted.live)
                for live in lives:
                    live.api_model = body.model or self.served.id
                    live.include_usage = bool(body.stream_options and body.stream_options.include_usage)
                first = lives[0]
                headers = {REGION_HEADER: first.region, ROUTE_HEADER: first.route}
                if n == 1:  # several choices are several requests: not resumed as one stream
                    headers[RESUME_HEADER] = self.guard.token(tenant.name, first.request_id)
                # A batch request's max_tokens capped under load says so (edge/admission.py).
                degraded = [a.degraded_max_tokens for a in admitted if a.degraded_max_tokens is not None]
                if degraded:
                    headers[DEGRADED_HEADER] = str(min(degraded))
                waits = [a.estimated_wait_s for a in admitted if a.estimated_wait_s is not None]
                if waits:
                    headers[ESTIMATED_WAIT_HEADER] = f"{max(waits):.3f}"
                if body.stream:
                    return await self._stream(request, lives, -1, headers, with_ids=n == 1 and reads_sse_ids(request))
                return await self._complete(lives, headers)
            except Refusal as refusal:
                retry = retry_after_header(refusal.retry_after_s) if refusal.retry_after_s is not None else 0
                raise ApiError(refusal.code, refusal.message, refusal.param, retry) from None
            finally:
                if n > 1:  # refused, failed, ended or left: nobody can come back for them
                    await self._cancel(lives, "choices_left")

    def _note_ignored(self, names: list[str]) -> None:
        for name in names:
            label, first = self.ignored.note(name)
            metrics.observe_ignored_field(label)
            if first:
                log.warning("request field ignored: no one here knows it (logged once per name)", field=label)

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

    @operation("The rest of a stream after Last-Event-ID (with X-Grokstack-Resume-Token)",
               streams=ChatCompletionChunk)
    async def resume(self, request: web.Request) -> web.StreamResponse:
        tenant = self._tenant(request)
        request_id = request.match_info["request_id"].removeprefix("chatcmpl-").removeprefix("cmpl-")
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
            return await self._stream(request, [live], last_seq, {RESUME_HEADER: token or ""}, with_ids=True)

    def _tenant(self, request: web.Request) -> Tenant:
        try:
            return self.keys.tenant_for(request.headers.get("Authorization"))
        except AuthError as exc:
            raise ApiError("unauthorized", str(exc)) from None

    async def _complete(self, lives: list[LiveRequest], headers: dict[str, str] | None = None) -> web.Response:
        """The whole answer of one body: its choices (`lives`, one request each) when all end."""
        first = lives[0]
        shape = shape_of(first.request.prompt_format)
        tokens: list[list[TokenEvent]] = [[] for _ in lives]
        finals: dict[int, FinalEvent] = {}
        async with contextlib.aclosing(self.live.follow_all(lives)) as events:
            async for index, event in events:
                if isinstance(event, TokenEvent):
                    tokens[index].append(event)
                elif isinstance(event, FinalEvent):
                    finals[index] = event
                else:
                    await self._cancel(lives, "choice_failed")  # before they are left: not a disconnect
                    raise ApiError(event.code, event.message, retry_after_s=1 if event.retryable else 0)
        if len(finals) < len(lives):
            raise ApiError("internal", "the request ended without a final event")
        info = self._info(first, finals[0])
        body = shape.whole(shape.id_of(first.request_id), int(first.request.created_at), first.api_model,
                           [Answer(tokens[i], finals[i]) for i in range(len(lives))], info)
        return web.Response(body=_json.encode(body), content_type="application/json",
                            headers={"X-Request-Id": first.request_id, **(headers or {})})

    async def _stream(self, request: web.Request, lives: list[LiveRequest], after_seq: int,
                      headers: dict[str, str] | None = None, with_ids: bool = True) -> web.StreamResponse:
        """The choices of one body (`lives`), streamed; `after_seq` and ids for one only."""
        first = lives[0]
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            "X-Request-Id": first.request_id, **(headers or {})})
        await response.prepare(request)
        shape = shape_of(first.request.prompt_format)
        cid, created, model = shape.id_of(first.request_id), int(first.request.created_at), first.api_model
        # usage on every chunk: asked on the request itself (so a resume on another edge has it too)
        continuous = first.request.sampling.count_prompt
        end = StreamEnd(shape, cid, created, model, len(lives), first.include_usage or continuous)
        running = RunningUsage(len(lives)) if continuous else None
        # where each choice's next token's text starts in its answer (the completions API's text_offset)
        offsets = [0] * len(lives)
        for index, live in enumerate(lives):  # what a resumed stream's client had before
            for earlier in live.events[:max(after_seq + 1, 0)]:
                if isinstance(earlier, TokenEvent):
                    offsets[index] += len(earlier.text)
                    if running:
                        running.seen(index, earlier)
        try:
            async with contextlib.aclosing(self.live.follow_all(lives, after_seq)) as events:
                async for index, event in events:
                    if isinstance(event, TokenEvent):
                        chunk = shape.chunk(cid, created, model, event, offsets[index], index)
                        if running:
                            chunk.usage = running.seen(index, event)
                        await self._send(response, event.seq, chunk, with_ids)
                        offsets[index] += len(event.text)
                    elif isinstance(event, FinalEvent):
                        chunks = end.finished(index, event, self._info(lives[index], event))
                        if running:
                            chunks[0].usage = running.of(index)
                        for chunk in chunks:
                            await self._send(response, event.seq, chunk, with_ids)
                    else:
                        await self._send(response, event.seq, error_body(event.code, event.message)[1], with_ids)
                        if len(lives) > 1:  # as vLLM: one choice's error ends the body's stream
                            await self._cancel(lives, "choice_failed")  # before they are left
                            break
            await self._write(response, b"data: [DONE]\n\n")
            await response.write_eof()
        except asyncio.TimeoutError:
            # The client stopped reading: drop it rather than let it hold memory and workers.
            log.warning("client too slow, dropping", request_id=first.request_id)
            await self._cancel(lives, "client_too_slow")
            if request.transport is not None:
                request.transport.abort()  # close() would wait to send what it buffered: forever
        return response

    def _info(self, live: LiveRequest, event: FinalEvent) -> GrokstackInfo:
        usage = usage_frame(event, live.ttft_ms, self._elapsed_ms(live), live.region, live.route)
        return info_of(live.request_id, event, usage)

    async def _cancel(self, lives: list[LiveRequest], reason: str) -> None:
        """All of them at once (nothing for one that ended): one that fails leaves none running."""
        results = await asyncio.gather(*(self.live.cancel(live, reason) for live in lives), return_exceptions=True)
        for live, result in zip(lives, results, strict=True):
            if isinstance(result, Exception):
                log.warning("cancel not sent", request_id=live.request_id, error=str(result))

    async def _send(self, response: web.StreamResponse, seq: int, payload: object, with_id: bool) -> None:
        await self._write(response, sse_event(seq if with_id else None, _json.encode(payload)))

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        await asyncio.wait_for(response.write(data), self.config.send_timeout_s)

    @staticmethod
    def _elapsed_ms(live: LiveRequest) -> float:
        return (time.monotonic() - live.started) * 1000


def reads_sse_ids(request: web.Request) -> bool:
    """Whether the client says it reads server-sent events as the spec has them (fields beside
    `data`): EventSource and SSE libraries ask for text/event-stream; the OpenAI SDKs and
    vLLM's benchmark do not."""
    return "text/event-stream" in request.headers.get("Accept", "")


def sse_event(seq: int | None, data: bytes) -> bytes:
    """One server-sent event: its data line, then its id when it has one (the spec takes the
    fields of an event in any order)."""
    if seq is None:
        return b"data: %s\n\n" % data
    return b"data: %s\nid: %d\n\n" % (data, seq)


def _ok(body: object) -> web.Response:
    return web.Response(body=_json.encode(body), content_type="application/json")
