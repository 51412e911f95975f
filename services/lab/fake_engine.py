"""A fast, deterministic engine behind the same interface, for unit and pipeline tests.

Tokens are UTF-8 bytes. The reply to a conversation is a fixed function of the prompt
("echo: " + the last user message, reversed), so a decode stage that continues from
prompt + first token produces exactly what a single stage would. With a `BlockStore` it also
keeps the KV contract: a request without a handle (prefill, aggregated) loads the full blocks
of its prompt that are stored, writes one small blob per full block of the prompt and reports a
handle; a decode job loads what the handle names (and its own blocks past it) and reports it as
cached; every role writes the blocks its answer fills, so the next turn finds them.
`die()` makes it behave as a vLLM engine whose engine core is gone: every request, running or
new, raises `EngineDead`, as VllmEngine's do.
"""

from __future__ import annotations

import asyncio
import codecs
from typing import AsyncIterator, Sequence

from bus.messages import ChatMessage, KvHandle, SamplingSpec, TokenLogprob, TopLogprob
from inference.engine import EngineChunk, EngineDead
from inference.pools import pool_named
from kv_store.block_store import BlockStore
from kv_store.keys import prompt_block_keys
from kv_store.records import KvReport, KvRequest

ASSISTANT = b"<|assistant|>"
BLOCK = 16
LAYOUT = "fake-layout"


def reply_for(prompt: bytes) -> bytes:
    last_user = prompt.rsplit(b"<|user|>", 1)[-1].split(b"\n", 1)[0]
    return b"echo: " + last_user.decode("utf-8", "replace")[::-1].encode()


def fake_logprobs(byte: int, top_n: int | None) -> list[TokenLogprob] | None:
    """Made-up but consistent numbers: the chosen byte is the most likely, then the bytes after it."""
    if top_n is None:
        return None
    text = bytes([byte]).decode("utf-8", "replace")
    top = [TopLogprob(bytes([(byte + i) % 128]).decode(), -0.25 * (i + 1)) for i in range(top_n)]
    return [TokenLogprob(text, -0.25, top)]


class FakeEngine:
    def __init__(self, role: str = "direct", token_delay_s: float = 0.0,
                 store: BlockStore | None = None, key_prefix: str = "gskv",
                 model_id: str = "fake", max_model_len: int = 4096,
                 kv_capacity_tokens: int = 65536) -> None:
        self.pool = pool_named(role)  # whose engine it stands for: its KV connector role
        self.token_delay_s = token_delay_s
        self.store = store
        self.key_prefix = key_prefix
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens
        self.started = self.aborted = 0
        self._dead: str | None = None
        self._died = asyncio.Event()

    async def start(self) -> None:
        return

    async def shutdown(self) -> None:
        return

    def die(self, reason: str = "fake engine core killed") -> None:
        """From now on every request fails as a dead vLLM engine's do."""
        self._dead = reason
        self._died.set()

    def dead_reason(self) -> str | None:
        return self._dead

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = "".join(f"<|{m.role}|>{m.content}\n" for m in messages).encode() + ASSISTANT
        return list(text)

    def tokenize(self, text: str) -> list[int]:
        # A text prompt is answered as a one-message chat would be (an echo of its text).
        return list(b"<|user|>" + text.encode() + b"\n" + ASSISTANT)

    def detokenize(self, token_ids: list[int]) -> str:
        return bytes(token_ids).decode("utf-8", "replace")

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                       max_tokens: int, kv: KvRequest | None = None) -> AsyncIterator[EngineChunk]:
        if self._dead is not None:
            raise EngineDead(self._dead)
        self.started += 1
        prompt = bytes(prompt_token_ids)
        head, _, already = prompt.rpartition(ASSISTANT)
        reply = reply_for(head + ASSISTANT)[len(already):]
        # as vLLM's min_tokens: no end before this call has given that many (its end token held back)
        reply += b"." * max(0, min(sampling.min_tokens, max_tokens) - len(reply))
        loaded, report = self._kv(prompt_token_ids, kv)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        emitted = 0
        try:
            for byte in reply[:max_tokens]:
                if self.token_delay_s:
                    await self._pause(self.token_delay_s)
                elif self._dead is not None:
                    raise EngineDead(self._dead)
                emitted += 1
                yield EngineChunk([byte], decoder.decode(bytes([byte])),
                                  prompt_tokens=len(prompt_token_ids), cached_tokens=loaded,
                                  logprobs=fake_logprobs(byte, sampling.logprobs))
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted += 1
            raise
        finish = "length" if len(reply) > max_tokens else "stop"
        self._save_answer(prompt_token_ids, list(reply[:emitted]), kv)
        yield EngineChunk([], decoder.decode(b"", final=True), finish, len(prompt_token_ids), loaded, report)

    async def _pause(self, seconds: float) -> None:
        """A token's time; a running request fails as soon as the engine dies."""
        try:
            await asyncio.wait_for(self._died.wait(), seconds)
        except asyncio.TimeoutError:
            return
        raise EngineDead(self._dead or "")

    def _kv(self, tokens: list[int], kv: KvRequest | None) -> tuple[int, KvReport | None]:
        if self.store is None or kv is None:
            return 0, None
        keys = prompt_block_keys(self.key_prefix, LAYOUT, tokens, BLOCK, len(tokens) // BLOCK, kv.namespace)
        loadable = keys[:(len(tokens) - 1) // BLOCK]
        if kv.handle is None:  # prefill or aggregated: load earlier turns, save this one
            loaded = self.store.present_prefix(loadable) * BLOCK
            self.store.save([(k, b"kv") for k in keys])
            handle = KvHandle(model_id=self.model_id, layout=LAYOUT, block_size=BLOCK, keys=keys,
                              num_tokens=len(keys) * BLOCK, content_hash=keys[-1] if keys else "")
            return loaded, KvReport(loaded_tokens=loaded, load_reason="", handle=handle)
        handle_keys = list(kv.handle.keys)
        valid = handle_keys == keys[:len(handle_keys)]
        loaded = self.store.present_prefix(loadable) * BLOCK if valid else 0
        if valid and loaded < len(handle_keys) * BLOCK:
            loaded = 0  # the fake recomputes everything on any miss
        return loaded, KvReport(loaded_tokens=loaded, load_reason="")

    def _save_answer(self, prompt: list[int], answer: list[int], kv: KvRequest | None) -> None:
        """The blocks the answer filled (its last token's KV is never computed, as in vLLM)."""
        if self.store is None or kv is None or len(answer) < 2:
            return
        tokens = prompt + answer[:-1]
        keys = prompt_block_keys(self.key_prefix, LAYOUT, tokens, BLOCK, len(tokens) // BLOCK, kv.namespace)
        self.store.save([(k, b"kv") for k in keys[len(prompt) // BLOCK:]])
