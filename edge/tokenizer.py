"""The served model's tokenizer at the edge, for /tokenize and /detokenize (vLLM's endpoints).

Loaded on first use from the model's folder or hub id (only its tokenizer files are read), in a
thread: tokenizing a long prompt takes milliseconds the event loop must not spend. The chat
template is the model's own, fed the messages as the workers' engines feed it
(ChatMessage.as_template_input), so the tokens are those a worker would compute. A load that
failed is tried again no sooner than RETRY_AFTER_S later: calls in between fail at once, so clients
cannot make every call a load.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import structlog

from bus.messages import ChatMessage

log = structlog.get_logger("grokstack.tokenizer")

RETRY_AFTER_S = 60.0


class TokenizerUnavailable(RuntimeError):
    """The model's tokenizer could not be loaded here (its files are not reachable from this edge)."""


class Tokenizer:
    def __init__(self, source: str) -> None:
        self.source = source
        self._loaded: Any = None
        # The load under way, shared: a caller that gives up (its client left) does not stop it,
        # and the next caller waits for it instead of starting another.
        self._loading: asyncio.Future | None = None
        self._failed: tuple[float, str] | None = None  # when the last load failed, and why

    async def _tokenizer(self) -> Any:
        if self._loaded is not None:
            return self._loaded
        if self._loading is None:
            if self._failed is not None and time.monotonic() - self._failed[0] < RETRY_AFTER_S:
                raise TokenizerUnavailable(self._failed[1])
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        loading = self._loading
        try:
            self._loaded = await asyncio.shield(loading)
        except TokenizerUnavailable as exc:
            if self._loading is loading:  # the first of its waiters to hear it
                self._loading, self._failed = None, (time.monotonic(), str(exc))
                log.warning("tokenizer not loaded", source=self.source, error=str(exc), retry_after_s=RETRY_AFTER_S)
            raise
        return self._loaded

    def _load(self) -> Any:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.source)
        except Exception as exc:  # no transformers, a missing folder, no way to the hub, a broken file: alike here
            raise TokenizerUnavailable(f"the tokenizer of {self.source!r} could not be loaded: {exc}") from exc
        log.info("tokenizer loaded", source=self.source, vocab=len(tokenizer))
        return tokenizer

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = await self._tokenizer()
        return list(await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens))

    async def render_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        tokenizer = await self._tokenizer()
        rendered = await asyncio.to_thread(
            tokenizer.apply_chat_template, [m.as_template_input() for m in messages],
            add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)

    async def token_strings(self, tokens: list[int]) -> list[str]:
        tokenizer = await self._tokenizer()
        return list(tokenizer.convert_ids_to_tokens(tokens))

    async def detokenize(self, tokens: list[int]) -> str:
        """ValueError naming the first id past the vocabulary."""
        tokenizer = await self._tokenizer()
        size = len(tokenizer)
        if (bad := next((t for t in tokens if t >= size), None)) is not None:
            raise ValueError(f"token id {bad} is not in the vocabulary ({size} tokens)")
        return str(await asyncio.to_thread(tokenizer.decode, tokens))
