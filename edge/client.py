"""A client of the edge's websocket protocol: `grokstack chat`, the bench and the tests use it.

`EdgeClient` is one connection. `RegionalClient` keeps each request until its final frame across the
loss of its edge, or of the edge's whole region: it reconnects to the next edge that answers and
resumes the request by id after the last token it saw, with the resume token its `accepted` frame
carried (the request id alone resumes nothing), waiting as told when the edge says resumes come too
fast (`rate_limited`); when no edge knows the request (its region accepted it just before dying,
before mirroring it elsewhere) it sends the same chat again and drops the new answer's tokens up to
the last one already shown.

Besides the edge's frames, `RegionalClient.stream` yields two of its own:
  {"type": "reconnected", "url": "ws://…"}           a new connection, to resume (or resend) on
  {"type": "resubmitted", "request_id": "…"}         no edge knew this request: the chat was sent again
and every client here ends a stream whose connection closed with
  {"type": "error", "id": …, "code": "connection_closed", "message": "…", "retryable": true}
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Sequence

import websockets
from websockets.asyncio.client import ClientConnection

Frame = dict[str, Any]
CONNECTION_CLOSED = "connection_closed"  # the code of the error frame a client makes when its socket closes


@dataclass
class ChatResult:
    text: str
    done: Frame | None  # the "done" frame, or None when the request failed
    error: Frame | None
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, tokens) per frame
    started: float = 0.0
    request_id: str = ""  # the request that answered (after a resubmission, the new one)
    resume_token: str = ""  # and what resumes it (edge/resume.py)
    region: str = ""  # the region that served it, and why (home, requested, sticky, overflow, failover)
    route: str = ""
    # No edge knew the request any more, so it was sent again: the text is what was shown of the first
    # answer, then the rest of the second (the same answer with temperature 0; sampled, it may not fit).
    resubmitted: bool = False


async def collect(frames: AsyncIterator[Frame]) -> ChatResult:
    """What a request's frames add up to."""
    result = ChatResult("", None, None, started=time.monotonic())
    async for frame in frames:
        if frame["type"] == "accepted":
            result.request_id = frame["request_id"]
            result.resume_token = frame.get("resume_token") or result.resume_token
            result.region = frame.get("region") or result.region
            result.route = frame.get("route") or result.route
        elif frame["type"] == "token":
            result.text += frame["text"]
            result.token_times.append((time.monotonic(), frame.get("tokens", 1)))
        elif frame["type"] == "done":
            result.done = frame
            result.region = frame["usage"].get("region") or result.region
            result.route = frame["usage"].get("route") or result.route
        elif frame["type"] == "error":
            result.error = frame
        elif frame["type"] == "resubmitted":
            result.resubmitted = True
    return result


def _closed(client_id: str | None, message: str = "the connection closed") -> Frame:
    return {"type": "error", "id": client_id, "code": CONNECTION_CLOSED, "message": message, "retryable": True}


class EdgeClient:
    """One websocket connection; several requests may be in flight on it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._queues: dict[str, asyncio.Queue[Frame]] = {}
        self._ids = (f"c{n}" for n in itertools.count(1))
        self.unrouted: asyncio.Queue[Frame] = asyncio.Queue()  # frames with no id
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> "EdgeClient":
        return cls(await websockets.connect(url, max_size=16 * 1024 * 1024, **kwargs))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()

    async def __aenter__(self) -> "EdgeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                queue = self._queues.get(frame.get("id") or "")
                (queue or self.unrouted).put_nowait(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            for client_id, queue in self._queues.items():
                queue.put_nowait(_closed(client_id))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    def stream(self, messages: list[dict[str, str]], *, id: str | None = None,
               **params: Any) -> AsyncGenerator[Frame, None]:
        """Frames of one request, from "accepted" to its "done" or "error" frame."""
        client_id = id or next(self._ids)
        return self._exchange(client_id, {"type": "chat", "id": client_id, "messages": messages,
                                          **{k: v for k, v in params.items() if v is not None}})

    def resume(self, request_id: str, last_seq: int, resume_token: str, *,
               id: str | None = None) -> AsyncGenerator[Frame, None]:
        """Frames of a request started earlier (perhaps on a lost connection), after `last_seq`;
        `resume_token` is the one its `accepted` frame carried."""
        client_id = id or next(self._ids)
        return self._exchange(client_id, {"type": "resume", "id": client_id, "request_id": request_id,
                                          "resume_token": resume_token, "last_seq": last_seq})

    async def _exchange(self, client_id: str, frame: Frame) -> AsyncGenerator[Frame, None]:
        queue: asyncio.Queue[Frame] = asyncio.Queue()
        self._queues[client_id] = queue
        try:
            try:
                if self._reader.done():  # closed already: nobody will tell this queue
                    raise ConnectionError
                await self.ws.send(json.dumps(frame))
            except (ConnectionError, websockets.ConnectionClosed):
                queue.put_nowait(_closed(client_id))
            while True:
                frame = await queue.get()
                yield frame
                if frame["type"] in ("done", "error"):
                    return
        finally:
            self._queues.pop(client_id, None)

    async def cancel(self, id: str) -> None:
        await self.ws.send(json.dumps({"type": "cancel", "id": id}))

    async def complete(self, messages: list[dict[str, str]], **params: Any) -> ChatResult:
        return await collect(self.stream(messages, **params))


class EdgeUnreachable(ConnectionError):
    """None of the edges answered for the time a client waits for one."""


class RegionalClient:
    """Requests that outlive their edge: one connection at a time to one of `urls` (edges of one or
    several regions), replaced by a connection to the next URL that answers when it drops.

    Connects to the first URL that answers. After a drop, tries the URLs round robin from the one
    after it, backing off between rounds, for `give_up_s`; then the requests in flight end with a
    "connection_closed" error. Several requests may be in flight: they move to the new connection
    together. `connect_kwargs` go to `websockets.connect` (e.g. additional_headers for an API key);
    its open_timeout is 5 s here, so that an edge gone with its host costs little before the next.
    """

    def __init__(self, urls: str | Sequence[str], *, give_up_s: float = 30.0, **connect_kwargs: Any) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("RegionalClient needs at least one edge URL")
        self.give_up_s = give_up_s
        self.connect_kwargs = {"open_timeout": 5.0, **connect_kwargs}
        self.client: EdgeClient | None = None  # the current connection
        self.url = ""  # and its URL
        self._next = 0  # the index (mod len(urls)) of the URL to try first
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> "RegionalClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def connect(self) -> EdgeClient:
        """The current connection, or one to the first URL that answers (EdgeUnreachable if none does)."""
        return await self._replace(None, time.monotonic() + self.give_up_s)

    async def _replace(self, lost: EdgeClient | None, give_up_at: float) -> EdgeClient:
        async with self._lock:
            if self.client is not None and self.client is not lost:
                return self.client  # another request found the loss first and reconnected
            if lost is not None:
                await lost.close()
            self.client = await self._first_answering(give_up_at)
            return self.client

    async def _first_answering(self, give_up_at: float) -> EdgeClient:
        delay, last_problem = 0.25, None
        while True:
            for _ in self.urls:
                url = self.urls[self._next % len(self.urls)]
                self._next += 1
                try:
                    client = await EdgeClient.connect(url, **self.connect_kwargs)
                except websockets.InvalidStatus as exc:
                    if exc.response.status_code < 500:  # e.g. 401: every edge says the same
                        raise
                    last_problem = exc
                except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
                    last_problem = exc  # down, unreachable, or dying during the handshake
                else:
                    self.url = url
                    return client
            if time.monotonic() + delay > give_up_at:
                raise EdgeUnreachable(f"no edge answered in {self.give_up_s:g} s (tried {', '.join(self.urls)}; "
                                      f"last: {last_problem})") from last_problem
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    def stream(self, messages: list[dict[str, str]], **params: Any) -> AsyncIterator[Frame]:
        """Frames of one request until its "done" or "error" frame, on whichever edges it takes:
        every token once and in order; an "accepted" frame per (re)start; and the "reconnected" and
        "resubmitted" frames of this module's docstring. EdgeUnreachable when no edge answers at the start."""
        messages = list(messages)
        return self._follow(lambda client: client.stream(messages, **params))

    async def complete(self, messages: list[dict[str, str]], **params: Any) -> ChatResult:
        return await collect(self.stream(messages, **params))

    async def _follow(self, submit: Callable[[EdgeClient], AsyncGenerator[Frame, None]] | None,
                      frames: AsyncGenerator[Frame, None] | None = None) -> AsyncIterator[Frame]:
        """The one place requests survive their edge. `submit` sends the request on a connection (None:
        it cannot be sent again, and `frames` has started it on the current connection)."""
        client = self.client if frames is not None else await self.connect()
        assert client is not None and (frames is not None or submit is not None)
        frames = frames if frames is not None else submit(client)
        request_id, token, last_seq, wait = "", "", -1, 0.0
        give_up_at: float | None = None  # while connections drop before a single frame comes
        while True:
            then = None
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    kind, code = frame["type"], frame.get("code")
                    if code == CONNECTION_CLOSED and (request_id or submit):
                        then = "reconnect"
                        break
                    if code == "unknown_request" and submit:
                        then = "resubmit"
                        break
                    if code == "rate_limited" and request_id and token:  # our resume came too fast
                        then = "wait"
                        wait = float(frame.get("retry_after_s") or 1.0)
                        break
                    give_up_at = None
                    if kind == "accepted":
                        request_id = frame["request_id"]
                        token = frame.get("resume_token") or token
                    elif kind == "token":
                        if frame["seq"] <= last_seq:  # shown already: a repeat, or a resubmitted answer's start
                            continue
                        last_seq = frame["seq"]
                    yield frame
                    if kind in ("done", "error"):
                        return
            if then is None:
                return
            if then == "wait":  # as a well-behaved client: what the edge said, with jitter
                await asyncio.sleep(wait * random.uniform(1.0, 1.5))
            elif then == "reconnect":
                give_up_at = give_up_at or time.monotonic() + self.give_up_s
                try:
                    client = await self._replace(client, give_up_at)
                except EdgeUnreachable as exc:
                    yield _closed(None, str(exc))
                    return
                yield {"type": "reconnected", "url": self.url}
            else:  # no edge knows the request: ask again; the tokens up to last_seq were shown
                yield {"type": "resubmitted", "request_id": request_id}
                request_id = ""
            frames = client.resume(request_id, last_seq, token) if request_id else submit(client)


async def complete_anywhere(urls: str | Sequence[str], messages: list[dict[str, str]], *, give_up_s: float = 30.0,
                            **params: Any) -> ChatResult:
    """One chat on the first of `urls` that answers, finished on the others if edges die under it."""
    async with RegionalClient(urls, give_up_s=give_up_s) as edges:
        return await edges.complete(messages, **params)


async def chat_repl(urls: str | Sequence[str], priority: str, max_tokens: int, temperature: float,
                    system: str | None, api_key: str | None = None) -> None:
    """A terminal chat: type a message, watch the answer stream; /reset clears, /quit leaves.
    A dropped connection is replaced by one to the next edge of `urls` that answers, and the answer
    resumed where it stopped (or asked again when no edge knows it any more). `api_key`: sent as
    `Authorization: Bearer <key>` to an edge that has keys."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    auth = {"additional_headers": {"Authorization": f"Bearer {api_key}"}} if api_key else {}
    async with RegionalClient(urls, **auth) as edges:
        print(f"connected to {edges.url}  (/reset to start over, /quit or Ctrl-D to leave)")
        while True:
            try:
                line = await asyncio.to_thread(input, "\nyou> ")
            except EOFError:
                return
            if line.strip() in ("/quit", "/exit"):
                return
            if line.strip() == "/reset":
                history = history[:1] if system else []
                print("(conversation cleared)")
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            sys.stdout.write("bot> ")
            answer = await _print_answer(edges.stream(history, priority=priority, max_tokens=max_tokens,
                                                      temperature=temperature))
            if answer:
                history.append({"role": "assistant", "content": answer})
            else:
                history.pop()


async def _print_answer(frames: AsyncIterator[Frame]) -> str:
    """Print one answer as it streams; its text."""
    answer, resubmitted, region, route = "", False, "", ""
    async for frame in frames:
        if frame["type"] == "accepted":
            region, route = frame.get("region") or region, frame.get("route") or route
        elif frame["type"] == "token":
            answer += frame["text"]
            sys.stdout.write(frame["text"])
            sys.stdout.flush()
        elif frame["type"] == "reconnected":
            sys.stdout.write(" [reconnected, resuming] ")
        elif frame["type"] == "resubmitted":
            resubmitted = True
            sys.stdout.write(" [no edge had the answer any more: asked again, continuing after what is shown] ")
        elif frame["type"] == "done":
            u = frame["usage"]
            region, route = u.get("region") or region, u.get("route") or route
            secs = max(u["total_ms"] - u["ttft_ms"], 1.0) / 1000
            print(f"\n   [{u['completion_tokens']} tokens, first after {u['ttft_ms']:.0f} ms, "
                  f"{(u['completion_tokens'] - 1) / secs:.1f} tok/s, "
                  f"{u['cached_prompt_tokens']}/{u['prompt_tokens']} prompt tokens from cache"
                  + (f", region {region} ({route})" if region else "")
                  + (", restarted: no edge had the first request" if resubmitted else "") + "]")
        elif frame["type"] == "error":
            print(f"\n   [error {frame['code']}: {frame['message']}]")
    return answer


async def _answer(url: str, client: EdgeClient, frames: AsyncGenerator[Frame, None]) -> tuple[EdgeClient, str]:
    """`_print_answer` of a request already started on `client` (which cannot be sent again); the
    connection it ended on. Kept for tests/pipeline/test_ws_resume.py, which drives it."""
    edges = RegionalClient([url])
    edges.client, edges.url = client, url
    answer = await _print_answer(edges._follow(None, frames))
    return edges.client, answer
