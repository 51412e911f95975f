"""A client of the edge's websocket protocol: `grokstack chat`, the bench and the tests use it."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import websockets
from websockets.asyncio.client import ClientConnection


@dataclass
class ChatResult:
    text: str
    done: dict[str, Any] | None  # the "done" frame, or None when the request failed
    error: dict[str, Any] | None
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, tokens) per frame
    started: float = 0.0
    request_id: str = ""


class EdgeClient:
    """One websocket connection; several requests may be in flight on it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._ids = (f"c{n}" for n in itertools.count(1))
        self.unrouted: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # frames with no id
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
            for queue in self._queues.values():
                queue.put_nowait({"type": "error", "code": "connection_closed", "message": "closed"})

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    def stream(self, messages: list[dict[str, str]], *, id: str | None = None,
               **params: Any) -> AsyncIterator[dict[str, Any]]:
        """Frames of one request, from "accepted" to its "done" or "error" frame."""
        client_id = id or next(self._ids)
        return self._exchange(client_id, {"type": "chat", "id": client_id, "messages": messages,
                                          **{k: v for k, v in params.items() if v is not None}})

    def resume(self, request_id: str, last_seq: int, *, id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Frames of a request started earlier (perhaps on a lost connection), after `last_seq`."""
        client_id = id or next(self._ids)
        return self._exchange(client_id, {"type": "resume", "id": client_id, "request_id": request_id,
                                          "last_seq": last_seq})

    async def _exchange(self, client_id: str, frame: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._queues[client_id] = queue
        try:
            await self.ws.send(json.dumps(frame))
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
        result = ChatResult("", None, None, started=time.monotonic())
        async for frame in self.stream(messages, **params):
            if frame["type"] == "accepted":
                result.request_id = frame["request_id"]
            elif frame["type"] == "token":
                result.text += frame["text"]
                result.token_times.append((time.monotonic(), frame.get("tokens", 1)))
            elif frame["type"] == "done":
                result.done = frame
            elif frame["type"] == "error":
                result.error = frame
        return result


async def reconnect(url: str, give_up_s: float = 10.0) -> EdgeClient:
    """A new connection, retried with backoff for about as long as the edge waits for us."""
    deadline, delay = time.monotonic() + give_up_s, 0.25
    while True:
        try:
            return await EdgeClient.connect(url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)


async def chat_repl(url: str, priority: str, max_tokens: int, temperature: float,
                    system: str | None) -> None:
    """A terminal chat: type a message, watch the answer stream; /reset clears, /quit leaves.
    A dropped connection is reopened and the answer resumed where it stopped."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    client = await EdgeClient.connect(url)
    print(f"connected to {url}  (/reset to start over, /quit or Ctrl-D to leave)")
    try:
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
            client, answer = await _answer(url, client, client.stream(
                history, priority=priority, max_tokens=max_tokens, temperature=temperature))
            if answer:
                history.append({"role": "assistant", "content": answer})
            else:
                history.pop()
    finally:
        await client.close()


async def _answer(url: str, client: EdgeClient, frames: AsyncIterator[dict[str, Any]]) -> tuple[EdgeClient, str]:
    """Print one answer as it streams, resuming it on a new connection if this one drops."""
    answer, request_id, last_seq = "", "", -1
    while True:
        async for frame in frames:
            if frame["type"] == "accepted":
                request_id = frame["request_id"]
            elif frame["type"] == "token" and frame["seq"] > last_seq:
                last_seq = frame["seq"]
                answer += frame["text"]
                sys.stdout.write(frame["text"])
                sys.stdout.flush()
            elif frame["type"] == "done":
                u = frame["usage"]
                secs = max(u["total_ms"] - u["ttft_ms"], 1.0) / 1000
                print(f"\n   [{u['completion_tokens']} tokens, first after {u['ttft_ms']:.0f} ms, "
                      f"{(u['completion_tokens'] - 1) / secs:.1f} tok/s, "
                      f"{u['cached_prompt_tokens']}/{u['prompt_tokens']} prompt tokens from cache]")
            elif frame["type"] == "error" and frame["code"] == "connection_closed" and request_id:
                await client.close()
                client = await reconnect(url)
                sys.stdout.write(" [reconnected, resuming] ")
                frames = client.resume(request_id, last_seq)
                break
            elif frame["type"] == "error":
                print(f"\n   [error {frame['code']}: {frame['message']}]")
        else:
            return client, answer
