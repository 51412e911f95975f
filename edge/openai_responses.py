"""The OpenAI API as clients get it back: the response objects of the chat-completions and
completions APIs (whole, or streamed as chunks), their usage and logprobs, built from the stack's
events by pure functions (ChatShape, TextShape, StreamEnd, RunningUsage), and errors as OpenAI's
error JSON with their HTTP status. No sockets here; the requests are edge/openai_wire.py.

Beside OpenAI's fields, the last chunk (or the whole response) carries a `grokstack` object: the
websocket `done` frame's usage with timings, the worker timings, the KV transfer and the cost.
"""

from __future__ import annotations

import importlib.metadata
from typing import Literal, NamedTuple, Union

from msgspec import Struct

from bus.messages import Cost, FinalEvent, KvTransfer, Speculation, Timings, TokenEvent, TokenLogprob
from edge.protocol import UsageFrame


class TokenizeResponse(Struct, omit_defaults=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(Struct):
    prompt: str


class Version(Struct):
    version: str


def package_version() -> str:
    try:
        return importlib.metadata.version("grokstack")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "0+unknown"


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class TopLogprobOut(Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(Struct):
    content: list[TokenLogprobOut]


class TextLogprobs(Struct):
    """The completions API's (legacy) shape: parallel lists, offsets into the completion's text."""
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class TextChoice(Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: TextLogprobs | None = None


class PromptTokensDetails(Struct):
    cached_tokens: int


class CompletionUsage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # None on a chunk of a continuous usage


class GrokstackInfo(Struct):
    """Where the time went: the websocket `done` frame's fields."""
    request_id: str
    finish_reason: str
    usage: UsageFrame
    timings: Timings
    kv: KvTransfer
    cost: Cost  # its share of the accelerators' time, priced (inference/cost_meter.py)
    speculation: Speculation  # draft tokens accepted, tokens per engine step


class ChatCompletionChunk(Struct, omit_defaults=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    grokstack: GrokstackInfo | None = None


class AssistantMessage(Struct):
    role: Literal["assistant"]
    content: str


class Choice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    grokstack: GrokstackInfo


class TextCompletionChunk(Struct, omit_defaults=True):
    """A streamed chunk of the completions API (vLLM's and OpenAI's object name for both shapes)."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage | None = None
    grokstack: GrokstackInfo | None = None


class TextCompletion(Struct):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage
    grokstack: GrokstackInfo


class Model(Struct):
    """As vLLM's model card: `root` is what the model was loaded from, `max_model_len` its context."""
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(Struct):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(Struct):
    error: ErrorDetail


def finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


class Answer(NamedTuple):
    """One choice, whole: its token events and its final event."""
    tokens: list[TokenEvent]
    final: FinalEvent


def usage_of(finals: list[FinalEvent]) -> CompletionUsage:
    """The usage of a body's choices: their prompt counted once, as vLLM counts it (the first
    choice's cached share), their completions summed."""
    first = finals[0].usage
    completion = sum(event.usage.completion_tokens for event in finals)
    return CompletionUsage(first.prompt_tokens, completion, first.prompt_tokens + completion,
                           PromptTokensDetails(first.cached_prompt_tokens))


def info_of(request_id: str, event: FinalEvent, usage: UsageFrame) -> GrokstackInfo:
    return GrokstackInfo(request_id, event.finish_reason, usage, event.timings, event.kv, event.cost,
                         event.speculation)


def _bytes(token: str) -> list[int]:
    return list(token.encode())


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if logprobs is None:
        return None
    return ChatLogprobs([TokenLogprobOut(t.token, t.logprob, _bytes(t.token),
                                         [TopLogprobOut(o.token, o.logprob, _bytes(o.token)) for o in t.top])
                         for t in logprobs])


def text_logprobs(logprobs: list[TokenLogprob] | None, offset: int) -> TextLogprobs | None:
    """`offset`: the length of the completion's text before these tokens."""
    if logprobs is None:
        return None
    offsets = []
    for t in logprobs:
        offsets.append(offset)
        offset += len(t.token)
    return TextLogprobs([t.token for t in logprobs], [t.logprob for t in logprobs],
                        # the chosen token first, then the most likely ones (vLLM's and OpenAI's shape)
                        [{t.token: t.logprob, **{o.token: o.logprob for o in t.top}} for t in logprobs], offsets)


class ChatShape:
    """The chat-completions API's objects, built from the stack's events."""
    path = "/v1/chat/completions"

    @staticmethod
    def id_of(request_id: str) -> str:
        return f"chatcmpl-{request_id}"

    def chunk(self, cid: str, created: int, model: str, event: TokenEvent, offset: int,
              index: int = 0) -> ChatCompletionChunk:
        delta = Delta(role="assistant" if event.seq == 0 else None, content=event.text)
        return ChatCompletionChunk(cid, "chat.completion.chunk", created, model,
                                   [ChunkChoice(index, delta, logprobs=chat_logprobs(event.logprobs))])

    def finish_chunk(self, cid: str, created: int, model: str, event: FinalEvent,
                     index: int = 0) -> ChatCompletionChunk:
        return ChatCompletionChunk(cid, "chat.completion.chunk", created, model,
                                   [ChunkChoice(index, Delta(), finish_reason(event.finish_reason))])

    def usage_chunk(self, cid: str, created: int, model: str, usage: CompletionUsage) -> ChatCompletionChunk:
        return ChatCompletionChunk(cid, "chat.completion.chunk", created, model, [], usage=usage)

    def whole(self, cid: str, created: int, model: str, answers: list[Answer], info: GrokstackInfo) -> ChatCompletion:
        choices = [Choice(i, AssistantMessage("assistant", "".join(t.text for t in a.tokens)),
                          finish_reason(a.final.finish_reason), chat_logprobs(_joined(a.tokens)))
                   for i, a in enumerate(answers)]
        return ChatCompletion(cid, "chat.completion", created, model, choices,
                              usage_of([a.final for a in answers]), info)


class TextShape:
    """The completions API's objects."""
    path = "/v1/completions"

    @staticmethod
    def id_of(request_id: str) -> str:
        return f"cmpl-{request_id}"

    def chunk(self, cid: str, created: int, model: str, event: TokenEvent, offset: int,
              index: int = 0) -> TextCompletionChunk:
        return TextCompletionChunk(cid, "text_completion", created, model,
                                   [TextChoice(index, event.text, logprobs=text_logprobs(event.logprobs, offset))])

    def finish_chunk(self, cid: str, created: int, model: str, event: FinalEvent,
                     index: int = 0) -> TextCompletionChunk:
        return TextCompletionChunk(cid, "text_completion", created, model,
                                   [TextChoice(index, "", finish_reason(event.finish_reason))])

    def usage_chunk(self, cid: str, created: int, model: str, usage: CompletionUsage) -> TextCompletionChunk:
        return TextCompletionChunk(cid, "text_completion", created, model, [], usage=usage)

    def whole(self, cid: str, created: int, model: str, answers: list[Answer], info: GrokstackInfo) -> TextCompletion:
        choices = [TextChoice(i, "".join(t.text for t in a.tokens), finish_reason(a.final.finish_reason),
                              text_logprobs(_joined(a.tokens), 0)) for i, a in enumerate(answers)]
        return TextCompletion(cid, "text_completion", created, model, choices,
                              usage_of([a.final for a in answers]), info)


Shape = Union[ChatShape, TextShape]


def shape_of(prompt_format: str) -> Shape:
    """The API a request came through, by how its prompt is made (ChatRequest.prompt_format)."""
    return TextShape() if prompt_format == "text" else ChatShape()


def _joined(tokens: list[TokenEvent]) -> list[TokenLogprob] | None:
    if not tokens or any(t.logprobs is None for t in tokens):
        return None
    return [lp for t in tokens for lp in t.logprobs or ()]


class RunningUsage:
    """The usage each chunk carries when asked (continuous_usage_stats), as vLLM counts it: the
    choice's prompt tokens (its token events carry them: SamplingSpec.count_prompt) and its
    completion tokens so far."""

    def __init__(self, n: int) -> None:
        self.prompt = [0] * n
        self.completion = [0] * n

    def seen(self, index: int, event: TokenEvent) -> CompletionUsage:
        self.prompt[index] = self.prompt[index] or event.prompt_tokens
        self.completion[index] += len(event.token_ids)
        return self.of(index)

    def of(self, index: int) -> CompletionUsage:
        prompt, completion = self.prompt[index], self.completion[index]
        return CompletionUsage(prompt, completion, prompt + completion)


class StreamEnd:
    """The chunks that end the choices of one streamed body. Each choice's finish chunk comes
    when it finishes; the usage chunk, when asked for (include_usage), after the last one. The
    `grokstack` object: on the last chunk of a one-choice stream; with n > 1, each choice's on its
    finish chunk."""

    def __init__(self, shape: Shape, cid: str, created: int, model: str, n: int, include_usage: bool) -> None:
        self.shape, self.cid, self.created, self.model = shape, cid, created, model
        self.n, self.include_usage = n, include_usage
        self.finals: dict[int, FinalEvent] = {}

    def finished(self, index: int, event: FinalEvent, info: GrokstackInfo) -> list[Struct]:
        self.finals[index] = event
        finish = self.shape.finish_chunk(self.cid, self.created, self.model, event, index)
        if self.n > 1 or not self.include_usage:
            finish.grokstack = info
        if not self.include_usage or len(self.finals) < self.n:
            return [finish]
        usage = self.shape.usage_chunk(self.cid, self.created, self.model,
                                       usage_of([self.finals[i] for i in sorted(self.finals)]))
        if self.n == 1:
            usage.grokstack = info
        return [finish, usage]


# Stable error code -> (HTTP status, OpenAI error type)
STATUS: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "invalid_request_error"),
    "invalid_frame": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "prompt_too_long": (400, "invalid_request_error"),
    "unauthorized": (401, "authentication_error"),
    "forbidden": (403, "permission_error"),
    "model_not_found": (404, "invalid_request_error"),
    "unknown_request": (404, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "frame_too_large": (413, "invalid_request_error"),
    "too_many_requests": (429, "rate_limit_error"),
    "overloaded": (429, "rate_limit_error"),
    "rate_limited": (429, "rate_limit_error"),
    "cancelled": (499, "cancelled"),
    "unavailable": (503, "service_unavailable"),
    "timeout": (504, "timeout"),
}


def status_of(code: str) -> int:
    """The HTTP status of an error code (both doors count their errors by it)."""
    return STATUS.get(code, (500, ""))[0]


def error_body(code: str, message: str, param: str | None = None) -> tuple[int, ErrorBody]:
    status, kind = STATUS.get(code, (500, "server_error"))
    return status, ErrorBody(ErrorDetail(message, kind, param, code))


def param_of(message: str) -> str | None:
    """The body field a validation message points at: `$.messages[0].role` -> messages,
    "missing required field `messages`" -> messages, "max_tokens must be ..." -> max_tokens."""
    if "`$." in message:
        return message.split("`$.", 1)[1].split("`", 1)[0].split("[", 1)[0].split(".", 1)[0] or None
    if "field `" in message:
        return message.split("field `", 1)[1].split("`", 1)[0] or None
    for name in ("max_tokens", "temperature", "top_p", "stop", "messages", "priority", "seed"):
        if message.startswith(name) or f" {name} " in message:
            return name
    return None
