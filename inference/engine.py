"""The one engine interface the workers use: vLLM's AsyncLLM here, a fake in unit tests.

An engine can die for good (vLLM's engine core process crashed or was killed): every call then
raises `EngineDead`, and `dead_reason()` says why. The worker tells that apart from a job's own
failure: it hands all its jobs back and its process exits (inference/worker.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol, Sequence

from bus.messages import ChatMessage, SamplingSpec, Speculation, TokenLogprob
from kv_store.records import KvReport, KvRequest


class EngineDead(RuntimeError):
    """The engine is gone for good: no job can be served by this process any more."""


class JobRefused(Exception):
    """A job that cannot be served as asked (a prompt too long, sampling parameters the engine
    refuses): tell the client, no retry."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class EngineChunk:
    """New output of one request since the previous chunk."""
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # set on the last chunk: stop | length | abort
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was loaded, not computed
    kv: KvReport | None = None  # the KV connector's report, on the last chunk (None without one)
    speculation: Speculation | None = None  # drafts verified for it, on the last chunk (when any)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the sampling asked for them


class Engine(Protocol):
    model_id: str
    max_model_len: int
    kv_capacity_tokens: int  # tokens of KV the engine's cache holds (known after start)

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def dead_reason(self) -> str | None:
        """None while the engine can serve (or has not started); why not once it died for good."""

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The model's chat template applied to `messages`, ready for the assistant's turn."""

    def tokenize(self, text: str) -> list[int]:
        """A plain text prompt's tokens (the completions API), with the tokenizer's special ones
        (a beginning-of-sequence token) as vLLM adds them."""

    def detokenize(self, token_ids: list[int]) -> str: ...

    def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                 max_tokens: int, kv: KvRequest | None = None) -> AsyncIterator[EngineChunk]:
        """Stream the completion, telling the KV connector `kv`. Cancelling the consuming task
        aborts the request."""
