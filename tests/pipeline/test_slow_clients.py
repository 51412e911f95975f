"""A client that stops reading its stream (SSE or websocket) is dropped and its request cancelled
once a send has waited `send_timeout_s`; the edge and the other clients' streams go on."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import AsyncIterator

from edge.client import EdgeClient
from services.lab.fake_engine import FakeEngine
from tests.pipeline.harness import eventually, running_stack
from tests.pipeline.test_chat_flow import expected
from tests.pipeline.test_openai_api import ready, sdk

BIG = "big answer please " * 12  # the reply is about 220 tokens


class BigTokens(FakeEngine):
    """Each token of a reply to BIG carries 64 KiB of text: a few fill every buffer on the way."""

    async def generate(self, request_id, prompt_token_ids, sampling, max_tokens, kv=None):
        big = b"big answer" in bytes(prompt_token_ids)
        async for chunk in super().generate(request_id, prompt_token_ids, sampling, max_tokens, kv):
            yield replace(chunk, text=chunk.text * 65536) if big and chunk.text else chunk


@asynccontextmanager
async def never_reading(host: str, port: int, first_bytes: bytes) -> AsyncIterator[socket.socket]:
    """A client socket with a tiny receive buffer that sends `first_bytes` and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(sock, first_bytes)
        yield sock
    finally:
        sock.close()


def http_post(host: str, port: int, path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def websocket_chat(host: str, port: int, chat: dict) -> bytes:
    """The handshake and one masked text frame, as a browser would send them."""
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    payload = json.dumps(chat).encode()
    assert len(payload) < 65536
    length = bytes([0x80 | len(payload)]) if len(payload) < 126 else b"\xfe" + struct.pack("!H", len(payload))
    header = b"\x81" + length  # a final text frame, masked
    mask = os.urandom(4)
    return handshake + header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def stack_settings(settings):
    # A long grace: a cancel can only come from the too-slow path.
    return settings.replace(send_timeout_s=1.0, resume_grace_s=60.0)


async def test_an_sse_client_that_stops_reading_is_dropped_while_another_stream_completes(settings):
    settings = stack_settings(settings)
    decode = BigTokens("decode", token_delay_s=0.01)
    async with running_stack(settings, FakeEngine("prefill"), decode) as stack:
        await ready(stack)
        host, port = settings.edge.edge_host, stack.edge.api_port
        body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": BIG}]}
        async with never_reading(host, port, http_post(host, port, "/v1/chat/completions", body)):
            await asyncio.sleep(0.5)  # its buffers fill up
            stream = await sdk(stack).chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "meanwhile"}], stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == expected("meanwhile")
            assert await eventually(lambda: stack.decode.worker.counters.cancelled == 1, timeout=20)
        assert decode.aborted == 1 and stack.decode.worker.counters.served >= 1


async def test_a_websocket_client_that_stops_reading_is_dropped_while_another_completes(settings):
    settings = stack_settings(settings)
    decode = BigTokens("decode", token_delay_s=0.01)
    async with running_stack(settings, FakeEngine("prefill"), decode) as stack:
        host, port = settings.edge.edge_host, stack.edge.port
        chat = {"type": "chat", "id": "a", "messages": [{"role": "user", "content": BIG}]}
        async with never_reading(host, port, websocket_chat(host, port, chat)):
            await asyncio.sleep(0.5)
            async with await EdgeClient.connect(stack.url) as client:
                result = await client.complete([{"role": "user", "content": "meanwhile"}])
            assert result.text == expected("meanwhile")
            assert await eventually(lambda: stack.decode.worker.counters.cancelled == 1, timeout=20)
        assert decode.aborted == 1
