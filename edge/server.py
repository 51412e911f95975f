"""The websocket edge node: frames in, requests onto the bus, token frames out.

Also answers plain HTTP `GET /healthz` (the process is up and connected to NATS) and
`GET /readyz` (and a prefill and a decode worker of its region sent a heartbeat recently).
"""

from __future__ import annotations

import asyncio
import http
import itertools
import time

import structlog
import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from bus.messages import FinalEvent, SamplingSpec, TokenEvent
from edge.gateway import Gateway, SubmitFailed
from edge.protocol import (
    AcceptedFrame,
    CancelFrame,
    ChatFrame,
    DoneFrame,
    ErrorFrame,
    FrameError,
    Limits,
    ServerFrame,
    TokenFrame,
    UsageFrame,
    encode_frame,
    parse_frame,
    stop_list,
)
from services.logs import request_context
from services.settings import Settings

log = structlog.get_logger("grokstack.edge")


def limits_of(settings: Settings) -> Limits:
    return Limits(settings.max_frame_bytes, settings.max_messages, settings.max_prompt_chars,
                  settings.max_tokens_limit, settings.default_max_tokens)


class ClientTooSlow(Exception):
    pass


class Connection:
    """One websocket: several requests in flight, each a task, all cancelled when it closes."""

    _numbers = itertools.count(1)

    def __init__(self, ws: ServerConnection, gateway: Gateway, settings: Settings) -> None:
        self.ws = ws
        self.gateway = gateway
        self.settings = settings
        self.limits = limits_of(settings)
        self.requests: dict[str, asyncio.Task] = {}
        self.cancelled_by_client: set[str] = set()
        self._send_lock = asyncio.Lock()
        self._auto_ids = (f"r{n}" for n in itertools.count(1))
        self.number = next(self._numbers)

    async def run(self) -> None:
        log.info("client connected", connection=self.number, peer=str(self.ws.remote_address))
        try:
            async for raw in self.ws:
                await self._on_frame(raw)
        except websockets.ConnectionClosed:
            pass
        finally:
            for task in self.requests.values():
                task.cancel()  # each cancels its request through the pipeline
            if self.requests:
                await asyncio.wait(list(self.requests.values()), timeout=5)
            log.info("client disconnected", connection=self.number)

    async def send(self, frame: ServerFrame) -> None:
        try:
            async with self._send_lock:
                await asyncio.wait_for(self.ws.send(encode_frame(frame)), self.settings.send_timeout_s)
        except asyncio.TimeoutError:
            # The client stopped reading: drop it rather than let it hold memory and workers.
            log.warning("client too slow, closing", connection=self.number)
            asyncio.get_running_loop().create_task(self.ws.close(1008, "client too slow"))
            raise ClientTooSlow() from None

    async def _on_frame(self, raw: str | bytes) -> None:
        try:
            frame = parse_frame(raw, self.limits)
        except FrameError as exc:
            await self.send(ErrorFrame(id=exc.id, code=exc.code, message=exc.message))
            return
        if isinstance(frame, CancelFrame):
            task = self.requests.get(frame.id)
            if task is None:
                await self.send(ErrorFrame(id=frame.id, code="unknown_id",
                                           message=f"no request {frame.id!r} in flight on this connection"))
            else:
                self.cancelled_by_client.add(frame.id)
                task.cancel()
            return
        client_id = frame.id or next(self._auto_ids)
        if client_id in self.requests:
            await self.send(ErrorFrame(id=client_id, code="duplicate_id",
                                       message=f"request {client_id!r} is already in flight"))
        elif len(self.requests) >= self.settings.max_inflight_per_connection:
            await self.send(ErrorFrame(
                id=client_id, code="too_many_requests", retryable=True,
                message=f"{len(self.requests)} requests in flight; the limit per connection is "
                        f"{self.settings.max_inflight_per_connection}"))
        else:
            self.requests[client_id] = asyncio.create_task(self._chat(client_id, frame))

    async def _chat(self, client_id: str, frame: ChatFrame) -> None:
        sampling = SamplingSpec(
            max_tokens=frame.max_tokens or self.settings.default_max_tokens,
            temperature=frame.temperature, top_p=frame.top_p, stop=stop_list(frame), seed=frame.seed)
        request = self.gateway.new_request(list(frame.messages), sampling, frame.priority,
                                           frame.conversation_id)
        with request_context(request.request_id, request.region, request.priority,
                             connection=self.number):
            try:
                await self._stream(client_id, request)
            except ClientTooSlow:
                await self.gateway.cancel(request.request_id, "client_too_slow")
            except asyncio.CancelledError:
                reason = "client_cancelled" if client_id in self.cancelled_by_client else "client_gone"
                log.info("request cancelled by client", reason=reason)
                await self.gateway.cancel(request.request_id, reason)
                if reason == "client_cancelled":
                    await self.send(ErrorFrame(id=client_id, code="cancelled",
                                               message="cancelled by the client"))
            finally:
                self.gateway.forget(request.request_id)
                self.requests.pop(client_id, None)
                self.cancelled_by_client.discard(client_id)

    async def _stream(self, client_id: str, request) -> None:
        started = time.monotonic()
        try:
            stream = await self.gateway.submit(request)
        except SubmitFailed as exc:
            log.warning("request not accepted", error=str(exc))
            await self.send(ErrorFrame(id=client_id, code="unavailable", message=str(exc), retryable=True))
            return
        log.info("request accepted", max_tokens=request.sampling.max_tokens)
        await self.send(AcceptedFrame(id=client_id, request_id=request.request_id))
        ttft_ms = 0.0
        deadline = started + self.settings.request_timeout_s
        while True:
            try:
                event = await stream.next(timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self.gateway.cancel(request.request_id, "timeout")
                await self.send(ErrorFrame(id=client_id, code="timeout", retryable=True,
                                           message=f"no answer within {self.settings.request_timeout_s:.0f} s"))
                return
            if isinstance(event, TokenEvent):
                if not ttft_ms:
                    ttft_ms = (time.monotonic() - started) * 1000
                await self.send(TokenFrame(id=client_id, seq=event.seq, text=event.text,
                                           tokens=len(event.token_ids)))
            elif isinstance(event, FinalEvent):
                total_ms = (time.monotonic() - started) * 1000
                u = event.usage
                await self.send(DoneFrame(
                    id=client_id, finish_reason=event.finish_reason,
                    usage=UsageFrame(u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens,
                                     round(ttft_ms, 2), round(total_ms, 2)),
                    timings=event.timings, kv=event.kv))
                log.info("request done", finish_reason=event.finish_reason,
                         completion_tokens=u.completion_tokens, cached_prompt_tokens=u.cached_prompt_tokens,
                         ttft_ms=round(ttft_ms, 1), total_ms=round(total_ms, 1))
                return
            else:
                if event.code == "stream_gap":
                    await self.gateway.cancel(request.request_id, "stream_gap")
                await self.send(ErrorFrame(id=client_id, code=event.code, message=event.message,
                                           retryable=event.retryable))
                log.info("request failed", code=event.code, reason=event.message)
                return


class EdgeServer:
    def __init__(self, settings: Settings, gateway: Gateway) -> None:
        self.settings = settings
        self.gateway = gateway
        self.server: Server | None = None

    async def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        self.server = await serve(
            self._connection, self.settings.edge_host, self.settings.edge_port,
            # Frames a little over our limit still get a readable error frame; far larger ones
            # are refused by the websocket layer itself (close code 1009).
            max_size=max(4 * self.settings.max_frame_bytes, 1024 * 1024),
            process_request=self._http, ping_interval=20, ping_timeout=20, close_timeout=5)
        port = self.server.sockets[0].getsockname()[1] if self.server.sockets else self.settings.edge_port
        log.info("edge listening", url=f"ws://{self.settings.edge_host}:{port}", edge_id=self.gateway.edge_id)
        return int(port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _connection(self, ws: ServerConnection) -> None:
        await Connection(ws, self.gateway, self.settings).run()

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            ok = self.gateway.nc.is_connected
            return connection.respond(http.HTTPStatus.OK if ok else http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      "ok\n" if ok else "nats disconnected\n")
        if request.path == "/readyz":
            alive = self.gateway.workers_alive()
            ok = self.gateway.nc.is_connected and all(alive.values())
            body = " ".join(f"{role}={'up' if up else 'down'}" for role, up in alive.items()) + "\n"
            return connection.respond(http.HTTPStatus.OK if ok else http.HTTPStatus.SERVICE_UNAVAILABLE, body)
        return None  # everything else is a websocket handshake
