"""The OpenAI chat-completions wire format: request and response schemas, and the pure
functions between them and the stack's own frames and events. No sockets here.

Requests are validated as strictly as OpenAI does (an unknown field is an error naming it) and
then through the same checks as a websocket chat frame, so both doors take the same input.
Extensions: `priority`, `region` and `conversation_id` body fields; responses carry a
`grokstack` object (usage with timings, worker timings and the KV transfer) on the last chunk.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct

from bus.messages import ChatMessage, Cost, FinalEvent, KvTransfer, Speculation, Timings, TokenEvent
from bus.priorities import Priority
from edge.config import EdgeConfig
from edge.protocol import ChatFrame, FrameError, UsageFrame, check_chat


class TextPart(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: str


class ApiMessage(Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[TextPart], Meta(max_length=256)], None] = None
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None  # as OpenAI's; dropped


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class ResponseFormat(Struct, forbid_unknown_fields=True):
    type: Literal["text"]


class ChatCompletionRequest(Struct, forbid_unknown_fields=True):
    model: str
    messages: list[ApiMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1  # one choice per request
    user: Annotated[str, Meta(max_length=256)] | None = None
    presence_penalty: Annotated[float, Meta(ge=0.0, le=0.0)] = 0.0  # not supported: 0 only
    frequency_penalty: Annotated[float, Meta(ge=0.0, le=0.0)] = 0.0
    logprobs: Literal[False] = False
    logit_bias: Annotated[dict[str, float], Meta(max_length=0)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Any], Meta(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    # As OpenAI bounds it: 16 pairs, keys of 64 characters, values of 512.
    metadata: Annotated[dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]],
                        Meta(max_length=16)] | None = None
    store: bool | None = None
    # grokstack extensions
    priority: Priority | None = None
    region: Annotated[str, Meta(max_length=64)] | None = None  # its pattern: as the chat frame's
    conversation_id: Annotated[str, Meta(max_length=64)] | None = None


def parse_request(body: bytes, limits: EdgeConfig) -> tuple[ChatCompletionRequest, ChatFrame]:
    """The request and the equivalent chat frame, both validated; FrameError otherwise."""
    if len(body) > limits.max_frame_bytes:
        raise FrameError("frame_too_large", f"the body is {len(body)} bytes; the limit is {limits.max_frame_bytes}")
    try:
        request = msgspec.json.decode(body, type=ChatCompletionRequest)
    except msgspec.ValidationError as exc:
        raise FrameError("invalid_request", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise FrameError("invalid_json", f"the body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec raises it for bad bytes inside a JSON string
        raise FrameError("invalid_json", f"the body is not valid UTF-8: {exc}") from None
    messages = [ChatMessage(role="system" if m.role == "developer" else m.role, content=_text(m.content))
                for m in request.messages]
    try:
        frame = ChatFrame(
            # `is None`, not `or`: max_completion_tokens 0 is out of range, not absent
            messages=messages, max_tokens=(request.max_tokens if request.max_completion_tokens is None
                                           else request.max_completion_tokens),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p, stop=request.stop, seed=request.seed,
            priority=request.priority, conversation_id=request.conversation_id, region=request.region)
        frame = msgspec.convert(msgspec.to_builtins(frame), ChatFrame)  # runs the field constraints
    except msgspec.ValidationError as exc:
        raise FrameError("invalid_request", str(exc)) from None
    check_chat(frame, limits)
    return request, frame


def _text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part.text for part in content)


# ---------------------------------------------------------------------------- responses


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class PromptTokensDetails(Struct):
    cached_tokens: int


class CompletionUsage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


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
    logprobs: None = None


class ChatCompletion(Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    grokstack: GrokstackInfo


class Model(Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


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


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def usage_of(event: FinalEvent) -> CompletionUsage:
    u = event.usage
    return CompletionUsage(u.prompt_tokens, u.completion_tokens, u.prompt_tokens + u.completion_tokens,
                           PromptTokensDetails(u.cached_prompt_tokens))


def info_of(request_id: str, event: FinalEvent, usage: UsageFrame) -> GrokstackInfo:
    return GrokstackInfo(request_id, event.finish_reason, usage, event.timings, event.kv, event.cost,
                         event.speculation)


def token_chunk(cid: str, created: int, model: str, event: TokenEvent) -> ChatCompletionChunk:
    delta = Delta(role="assistant" if event.seq == 0 else None, content=event.text)
    return ChatCompletionChunk(cid, "chat.completion.chunk", created, model, [ChunkChoice(0, delta)])


def final_chunks(cid: str, created: int, model: str, event: FinalEvent, info: GrokstackInfo,
                 include_usage: bool) -> list[ChatCompletionChunk]:
    """The finish chunk, then the usage chunk when asked for; the last one carries `grokstack`."""
    finish = ChatCompletionChunk(cid, "chat.completion.chunk", created, model,
                                 [ChunkChoice(0, Delta(), finish_reason(event.finish_reason))])
    if not include_usage:
        finish.grokstack = info
        return [finish]
    return [finish, ChatCompletionChunk(cid, "chat.completion.chunk", created, model, [],
                                        usage=usage_of(event), grokstack=info)]


def completion(cid: str, created: int, model: str, text: str, event: FinalEvent,
               info: GrokstackInfo) -> ChatCompletion:
    return ChatCompletion(cid, "chat.completion", created, model,
                          [Choice(0, AssistantMessage("assistant", text), finish_reason(event.finish_reason))],
                          usage_of(event), info)


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
