"""The websocket edge node: frames in, requests onto the bus, token frames out.

Also answers plain HTTP: `GET /` is the chat page, `GET /healthz` and `GET /readyz` (as on the
metrics port, `EdgeServer.health` and `Gateway.readiness`: liveness is the event loop running,
readiness NATS connected).

A browser's websocket handshake carries an Origin header: only the chat page's own origin (the
same host and port as the request's Host header) and the `allowed_origins` setting's may open the
websocket; any other gets 403. A handshake without Origin is not a browser's and is let in.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import structlog
import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from bus import tracing
from bus.messages import Event, FinalEvent, TokenEvent
from edge import metrics
from edge.intake import Intake, Refusal
from edge.live import LiveRequest, LiveRequests
from edge.openai_responses import status_of
from edge.resume import ResumeGuard, ResumeRateLimited, retry_after_s
from edge.protocol import (
    AcceptedFrame,
    CancelFrame,
    ChatFrame,
    DoneFrame,
    ErrorFrame,
    FrameError,
    ResumeFrame,
    ServerFrame,
    TokenFrame,
    encode_frame,
    parse_frame,
    usage_frame,
)
from edge.tenants import ApiKeys, AuthError, Tenant
from bus.log_context import request_context
from edge.config import EdgeConfig

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"

log = structlog.get_logger("grokstack.edge")


class ClientTooSlow(Exception):
    pass


class Connection:
    """One websocket: several requests followed at once, each by a task. Closing the socket
    stops the following, not the requests: they wait `resume_grace_s` for a resume."""

    _numbers = itertools.count(1)

    def __init__(self, ws: ServerConnection, live: LiveRequests, tenant: Tenant,
                 config: EdgeConfig, intake: Intake, guard: ResumeGuard) -> None:
        self.ws = ws
        self.live = live
        self.intake = intake
        self.guard = guard
        self.resumes = guard.client_bucket()  # this connection's resumes
        self.tenant = tenant
        self.config = config
        self.follows: dict[str, asyncio.Task] = {}  # client id -> its task
        self.following: dict[str, LiveRequest] = {}  # client id -> its request, once known
        self.cancel_asked: set[str] = set()  # cancels that came before the request was known
        self._send_lock = asyncio.Lock()
        self._auto_ids = (f"r{n}" for n in itertools.count(1))
        self.number = next(self._numbers)
        # A client's trace (W3C traceparent on the handshake): the parent of each chat it sends here.
        self.trace_parent = tracing.context_of(ws.request.headers if ws.request else None)

    async def run(self) -> None:
        log.info("client connected", connection=self.number, peer=str(self.ws.remote_address),
                 tenant=self.tenant.name)
        try:
            async for raw in self.ws:
                await self._on_frame(raw)
        except websockets.ConnectionClosed:
            pass
        finally:
            for task in self.follows.values():
                task.cancel()
            if self.follows:
                await asyncio.wait(list(self.follows.values()), timeout=5)
            log.info("client disconnected", connection=self.number)

    async def send(self, frame: ServerFrame) -> None:
        try:
            async with self._send_lock:
                await asyncio.wait_for(self.ws.send(encode_frame(frame)), self.config.send_timeout_s)
        except asyncio.TimeoutError:
            # The client stopped reading: drop it rather than let it hold memory and workers.
            log.warning("client too slow, closing", connection=self.number)
            asyncio.get_running_loop().create_task(self.ws.close(1008, "client too slow"))
            raise ClientTooSlow() from None

    async def _error(self, client_id: str | None, code: str, message: str, retryable: bool = False,
                     retry_after_s: float | None = None) -> None:
        metrics.observe_request("websocket", status_of(code), code)
        log.info("frame refused", code=code, reason=message[:512], client_id=client_id)
        await self.send(ErrorFrame(id=client_id, code=code, message=message, retryable=retryable,
                                   retry_after_s=retry_after_s))

    async def _on_frame(self, raw: str | bytes) -> None:
        try:
            frame = parse_frame(raw, self.config)
        except FrameError as exc:
            await self._error(exc.id, exc.code, exc.message)
            return
        if isinstance(frame, CancelFrame):
            await self._cancel(frame.id)
            return
        client_id = frame.id or next(self._auto_ids)
        if client_id in self.follows:
            await self._error(client_id, "duplicate_id", f"request {client_id!r} is already in flight")
        elif len(self.follows) >= self.config.max_inflight_per_connection:
            await self._error(client_id, "too_many_requests", f"{len(self.follows)} requests in flight; the "
                              f"limit per connection is {self.config.max_inflight_per_connection}", True)
        else:
            work = self._chat(client_id, frame) if isinstance(frame, ChatFrame) else self._resume(client_id, frame)
            self.follows[client_id] = asyncio.create_task(work)

    async def _cancel(self, client_id: str) -> None:
        live = self.following.get(client_id)
        if live is not None:  # its follower forwards the cancelled event and ends
            await self.live.cancel(live, "client_cancelled")
        elif client_id in self.follows:
            self.cancel_asked.add(client_id)
        else:
            await self._error(client_id, "unknown_id", f"no request {client_id!r} in flight on this connection")

    async def _chat(self, client_id: str, frame: ChatFrame) -> None:
        try:
            async with self.intake.accept(frame, self.tenant, self.trace_parent, connection=self.number) as accepted:
                await self._follow(client_id, accepted.live, -1, resumed=False,
                                   degraded_max_tokens=accepted.degraded_max_tokens,
                                   estimated_wait_s=accepted.estimated_wait_s)
        except Refusal as refusal:
            await self._error(client_id, refusal.code, refusal.message, refusal.retry_after_s is not None,
                              refusal.retry_after_s)
        finally:
            self._forget(client_id)

    def _forget(self, client_id: str) -> None:
        self.follows.pop(client_id, None)
        self.following.pop(client_id, None)
        self.cancel_asked.discard(client_id)

    async def _resume(self, client_id: str, frame: ResumeFrame) -> None:
        try:
            try:
                allowed = self.guard.admit(self.resumes, self.tenant.name, frame.request_id, frame.resume_token)
            except ResumeRateLimited as exc:
                wait = retry_after_s(exc.retry_after_s)
                await self._error(client_id, "rate_limited", exc.message, True, wait)
                return
            # A wrong token is answered as an unknown id, without looking anything up.
            live = await self.live.resumable(frame.request_id, self.tenant.name) if allowed else None
            if live is None:
                await self._error(client_id, "unknown_request", f"no request {frame.request_id!r} to resume "
                                  "with this resume token (unknown, another tenant's, older than the capture "
                                  "stream keeps, or not its token)")
                return
            with request_context(live.request_id, live.request.region, live.request.priority,
                                 connection=self.number, tenant=self.tenant.name):
                log.info("request resumed", last_seq=frame.last_seq)
                await self._follow(client_id, live, frame.last_seq, resumed=True)
        finally:
            self._forget(client_id)

    async def _follow(self, client_id: str, live: LiveRequest, after_seq: int, resumed: bool,
                      degraded_max_tokens: int | None = None, estimated_wait_s: float | None = None) -> None:
        self.following[client_id] = live
        if client_id in self.cancel_asked:
            await self.live.cancel(live, "client_cancelled")
        try:
            await self.send(AcceptedFrame(id=client_id, request_id=live.request_id, resumed=resumed,
                                          resume_token=self.guard.token(live.tenant, live.request_id),
                                          max_tokens=degraded_max_tokens, region=live.region,
                                          route=live.route or None,
                                          estimated_wait_s=None if estimated_wait_s is None
                                          else round(estimated_wait_s, 3)))
            async for event in self.live.follow(live, after_seq):
                await self.send(self._frame(client_id, live, event))
        except ClientTooSlow:
            await self.live.cancel(live, "client_too_slow")

    def _frame(self, client_id: str, live: LiveRequest, event: Event) -> ServerFrame:
        if isinstance(event, TokenEvent):
            return TokenFrame(id=client_id, seq=event.seq, text=event.text, tokens=len(event.token_ids),
                              logprobs=event.logprobs)
        if isinstance(event, FinalEvent):
            total_ms = (time.monotonic() - live.started) * 1000
            u = event.usage
            log.info("request done", finish_reason=event.finish_reason, completion_tokens=u.completion_tokens,
                     cached_prompt_tokens=u.cached_prompt_tokens, ttft_ms=round(live.ttft_ms, 1),
                     total_ms=round(total_ms, 1))
            metrics.observe_request("websocket", 200)
            return DoneFrame(id=client_id, finish_reason=event.finish_reason,
                             usage=usage_frame(event, live.ttft_ms, total_ms, live.region, live.route),
                             timings=event.timings, kv=event.kv, cost=event.cost, speculation=event.speculation)
        log.info("request failed", code=event.code, reason=event.message)
        metrics.observe_request("websocket", status_of(event.code), event.code)
        return ErrorFrame(id=client_id, code=event.code, message=event.message, retryable=event.retryable)


class LoopWatch:
    """Whether the event loop runs: it notes the time every second; a probe, answered from another
    thread (the metrics port), reads how long ago."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.last = time.monotonic()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            self.last = time.monotonic()
            await asyncio.sleep(1.0)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def check(self) -> tuple[bool, str]:
        late = time.monotonic() - self.last
        if late > self.stall_s:
            return False, f"event loop stalled: it has not run for {late:.1f} s (limit {self.stall_s:g} s)\n"
        return True, "event loop running\n"


class EdgeServer:
    def __init__(self, config: EdgeConfig, live: LiveRequests, keys: ApiKeys, intake: Intake,
                 guard: ResumeGuard) -> None:
        self.config = config
        self.live = live
        self.intake = intake
        self.guard = guard
        self.gateway = live.gateway
        self.keys = keys
        self.server: Server | None = None
        self.loop_watch = LoopWatch(config.loop_stall_s)
        self.origins = {o.strip().rstrip("/").lower() for o in config.allowed_origins.split(",") if o.strip()}

    async def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        self.loop_watch.start()
        self.server = await serve(
            self._connection, self.config.edge_host, self.config.edge_port,
            # Frames a little over our limit still get a readable error frame; far larger ones
            # are refused by the websocket layer itself (close code 1009).
            max_size=max(4 * self.config.max_frame_bytes, 1024 * 1024),
            process_request=self._http, ping_interval=20, ping_timeout=20, close_timeout=5)
        port = self.server.sockets[0].getsockname()[1] if self.server.sockets else self.config.edge_port
        log.info("edge listening", url=f"ws://{self.config.edge_host}:{port}", edge_id=self.gateway.edge_id)
        return int(port)

    async def stop(self) -> None:
        self.loop_watch.stop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def health(self) -> tuple[bool, str]:
        """Liveness: the event loop runs and the bus client has not given up (a NATS outage alone is
        not a reason to restart: the client reconnects, and every edge would restart at once)."""
        (loop_ok, loop_body), (bus_ok, bus_body) = self.loop_watch.check(), self.gateway.health()
        return loop_ok and bus_ok, loop_body + bus_body

    async def _connection(self, ws: ServerConnection) -> None:
        tenant = self._tenant(ws.request)  # checked in _http already; cannot fail here
        await Connection(ws, self.live, tenant, self.config, self.intake, self.guard).run()

    def _tenant(self, request: Request | None) -> Tenant:
        """From `Authorization: Bearer <key>`, or `?api_key=` (browsers cannot set headers on a
        websocket)."""
        assert request is not None
        key = parse_qs(urlsplit(request.path).query).get("api_key", [""])[0]
        if key and self.keys.required:
            return self.keys.tenant_for_key(key)
        return self.keys.tenant_for(request.headers.get("Authorization"))

    def origin_refused(self, request: Request) -> str | None:
        """Why the handshake's Origin may not open the websocket; None when it may."""
        origin = request.headers.get("Origin")
        if origin is None or "*" in self.origins:
            return None
        normal = origin.strip().rstrip("/").lower()
        parts = urlsplit(normal)
        host = request.headers.get("Host", "").strip().lower()
        if normal in self.origins or (parts.scheme in ("http", "https") and host and parts.netloc == host):
            return None
        return (f"origin {origin!r} may not open this websocket: only the chat page's own origin and those "
                f"in the allowed_origins setting (GROKSTACK_ALLOWED_ORIGINS, now {self.config.allowed_origins!r}) "
                "may\n")

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            ok, body = self.health()
            return connection.respond(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)
        if path == "/readyz":
            ok, body = self.gateway.readiness()
            return connection.respond(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return self._page(connection, path)
        refused = self.origin_refused(request)
        if refused is not None:
            log.warning("websocket origin refused", origin=request.headers.get("Origin"))
            return connection.respond(HTTPStatus.FORBIDDEN, refused)
        try:
            self._tenant(request)
        except AuthError as exc:
            return connection.respond(HTTPStatus.UNAUTHORIZED, f"{exc}\n")
        return None  # a websocket handshake

    def _page(self, connection: ServerConnection, path: str) -> Response:
        if path not in ("/", "/chat", "/index.html") or not CHAT_PAGE.exists():
            return connection.respond(HTTPStatus.NOT_FOUND, "not found: the chat page is at /, the "
                                      "websocket at /ws\n")
        body = CHAT_PAGE.read_bytes()
        headers = Headers([("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-cache")])
        return Response(HTTPStatus.OK.value, "OK", headers, body)
