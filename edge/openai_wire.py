"""The OpenAI chat-completions wire format: request and response schemas, and the pure
functions between them and the stack's own frames and events. No sockets here.

Requests are validated as strictly as OpenAI does (an unknown field is an error naming it) and
then through the same checks as a websocket chat frame, so both doors take the same input.
Extensions: `priority`, `region` and `conversation_id` body fields; responses carry a
`grokstack` object (usage with timings, worker timings and the KV transfer) on the last chunk.
"""

from __future__ import annotations

import importlib.metadata
from typing import Annotated, Any, Literal, NamedTuple, Union

import msgspec
from msgspec import Meta, Struct

from bus.messages import (
    MAX_LOGPROBS,
    ChatMessage,
    Cost,
    FinalEvent,
    FunctionCall,
    KvTransfer,
    Speculation,
    Timings,
    TokenEvent,
    TokenLogprob,
    ToolCall,
)
from bus.priorities import Priority
from edge.config import EdgeConfig
from edge.protocol import ChatFrame, FrameError, UsageFrame, check_chat


class TextPart(Struct, tag="text", tag_field="type"):
    text: str


class ApiFunctionCall(Struct):
    name: Annotated[str, Meta(max_length=256)]
    arguments: str


class ApiToolCall(Struct):
    id: Annotated[str, Meta(max_length=256)]
    function: ApiFunctionCall
    type: Literal["function"] = "function"


class ApiMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, Annotated[list[TextPart], Meta(max_length=256)], None] = None
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None  # as OpenAI's; dropped
    tool_calls: Annotated[list[ApiToolCall], Meta(max_length=128)] | None = None  # an assistant turn's
    tool_call_id: Annotated[str, Meta(max_length=256)] | None = None  # the call a tool message answers


class StreamOptions(Struct):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ResponseFormat(Struct):
    type: str


TokenIdText = Annotated[str, Meta(pattern=r"^[0-9]{1,10}$")]  # OpenAI's logit_bias keys


class SamplingBody(Struct, kw_only=True):
    """What the chat and completions bodies share: vLLM's sampling fields, then the ones this
    server does not serve (refused unless at their default: NOT_SERVED), then grokstack's.
    A field no one here knows is ignored, logged once and counted (as vLLM does): IgnoredFields."""
    model: str | None = None  # None: the model this edge serves (as vLLM)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int | None = 1
    user: Annotated[str, Meta(max_length=256)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Annotated[dict[TokenIdText, float], Meta(max_length=300)] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    stop_token_ids: Annotated[list[int], Meta(max_length=64)] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    # vLLM's, not served here
    use_beam_search: bool | None = False
    best_of: int | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: msgspec.Raw | None = None
    truncate_prompt_tokens: int | None = None
    echo: bool | None = False
    # As OpenAI bounds it: 16 pairs, keys of 64 characters, values of 512.
    metadata: Annotated[dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]],
                        Meta(max_length=16)] | None = None
    store: bool | None = None
    # grokstack's; an integer is vLLM's scheduling priority, taken at its default 0 only
    priority: Union[Priority, int, None] = None
    region: Annotated[str, Meta(max_length=64)] | None = None  # its pattern: as the chat frame's
    conversation_id: Annotated[str, Meta(max_length=64)] | None = None


class ChatCompletionRequest(SamplingBody, kw_only=True):
    messages: list[ApiMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: Annotated[list[msgspec.Raw], Meta(max_length=128)] | None = None
    tool_choice: Union[str, msgspec.Raw, None] = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat-template fields, not served here
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: msgspec.Raw | None = None
    documents: msgspec.Raw | None = None


class CompletionRequest(SamplingBody, kw_only=True):
    # A text, or a list holding one (several prompts per request, or token ids, are not served).
    prompt: Union[str, Annotated[list[Any], Meta(max_length=1)]]
    logprobs: int | None = None
    suffix: str | None = None


AnyRequest = Union[ChatCompletionRequest, CompletionRequest]

# vLLM's fields this server cannot honour: a value other than the default would get an answer
# that is not what was asked, so it is refused with a 400 naming the field.
NOT_SERVED: dict[str, tuple[object, ...]] = {
    "n": (None, 1),  # one choice per request: ask n times
    "use_beam_search": (None, False),
    "best_of": (None, 1),
    "prompt_logprobs": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "structured_outputs": (None,),
    "truncate_prompt_tokens": (None,),
    "echo": (None, False),
    "suffix": (None,),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "chat_template_kwargs": (None,),
    "documents": (None,),
}


class Parsed(NamedTuple):
    request: AnyRequest
    frame: ChatFrame
    ignored: list[str]  # top-level fields no one here knows, ignored


def parse_request(body: bytes, limits: EdgeConfig, kind: type[AnyRequest] = ChatCompletionRequest) -> Parsed:
    """The request, the equivalent chat frame (both validated) and the fields it ignored;
    FrameError otherwise."""
    if len(body) > limits.max_frame_bytes:
        raise FrameError("frame_too_large", f"the body is {len(body)} bytes; the limit is {limits.max_frame_bytes}")
    try:
        request = msgspec.json.decode(body, type=kind)
        # its top-level names, their values left unparsed
        names = msgspec.json.decode(body, type=dict[str, msgspec.Raw]).keys()
    except msgspec.ValidationError as exc:
        raise FrameError("invalid_request", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise FrameError("invalid_json", f"the body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec raises it for bad bytes inside a JSON string
        raise FrameError("invalid_json", f"the body is not valid UTF-8: {exc}") from None
    _refuse_not_served(request)
    if isinstance(request, ChatCompletionRequest):
        messages = [_message(m) for m in request.messages]
        max_tokens = request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        prompt_format = "chat"
    else:
        messages = [ChatMessage(role="user", content=_prompt_text(request.prompt))]
        max_tokens = 16 if request.max_tokens is None else request.max_tokens  # OpenAI's and vLLM's default
        top_logprobs = request.logprobs
        prompt_format = "text"
    try:
        frame = ChatFrame(
            # `is None`, not `or`: max_completion_tokens 0 is out of range, not absent
            messages=messages, max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p, stop=request.stop, seed=request.seed,
            priority=request.priority if isinstance(request.priority, str) else None,
            conversation_id=request.conversation_id, region=request.region,
            top_k=request.top_k or 0, min_p=request.min_p or 0.0,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            presence_penalty=request.presence_penalty or 0.0, frequency_penalty=request.frequency_penalty or 0.0,
            ignore_eos=bool(request.ignore_eos), min_tokens=request.min_tokens or 0,
            stop_token_ids=request.stop_token_ids or [],
            include_stop_str_in_output=bool(request.include_stop_str_in_output),
            skip_special_tokens=request.skip_special_tokens is not False,
            spaces_between_special_tokens=request.spaces_between_special_tokens is not False,
            logit_bias={int(k): v for k, v in (request.logit_bias or {}).items()}, logprobs=top_logprobs,
            prompt_format=prompt_format)
        frame = msgspec.convert(msgspec.to_builtins(frame), ChatFrame)  # runs the field constraints
    except msgspec.ValidationError as exc:
        raise FrameError("invalid_request", str(exc)) from None
    if frame.logprobs is not None and not 0 <= frame.logprobs <= MAX_LOGPROBS:
        name = "top_logprobs" if prompt_format == "chat" else "logprobs"
        raise FrameError("invalid_request", f"{name} must be between 0 and {MAX_LOGPROBS}, got {frame.logprobs}",
                         param=name)
    check_chat(frame, limits)
    known = {f.encode_name for f in msgspec.structs.fields(kind)}
    return Parsed(request, frame, [name for name in names if name not in known])


def _refuse_not_served(request: AnyRequest) -> None:
    for name, defaults in NOT_SERVED.items():
        value = getattr(request, name, None)
        if value not in defaults:
            raise FrameError("invalid_request", f"{name} is not served by this server (vLLM's field; only its "
                             f"default is taken here, got {_short(value)})", param=name)
    if request.response_format is not None and request.response_format.type != "text":
        raise FrameError("invalid_request", f"response_format {request.response_format.type!r} is not served "
                         "(structured output): only 'text'", param="response_format")
    if isinstance(request.priority, int) and request.priority != 0:
        raise FrameError("invalid_request", "priority as a number (vLLM's scheduling priority) is taken at 0 only; "
                         "this server's priorities are interactive, standard and batch", param="priority")
    if request.stream_options is not None and request.stream_options.continuous_usage_stats:
        raise FrameError("invalid_request", "stream_options.continuous_usage_stats is not served: the usage "
                         "comes with the last chunk (include_usage)", param="stream_options")
    if isinstance(request, ChatCompletionRequest) and request.tools and request.tool_choice != "none":
        raise FrameError("invalid_request", "tools: tool calling is not served (no tool-call parser); tools are "
                         "taken only with tool_choice 'none', and are not shown to the model", param="tools")


def _short(value: object) -> str:
    text = repr(value.decode() if isinstance(value, (bytes, msgspec.Raw)) else value)
    return text if len(text) <= 64 else text[:61] + "..."


def chat_messages(messages: list[ApiMessage], limits: EdgeConfig) -> list[ChatMessage]:
    """The history as the bus carries it, bounded as a chat frame's (FrameError otherwise)."""
    if len(messages) > limits.max_messages:
        raise FrameError("invalid_request", f"{len(messages)} messages; the limit is {limits.max_messages}")
    out = [_message(m) for m in messages]
    chars = sum(len(m.content) for m in out)
    if chars > limits.max_prompt_chars:
        raise FrameError("invalid_request", f"the messages hold {chars} characters; the limit is "
                         f"{limits.max_prompt_chars}")
    return out


def _message(m: ApiMessage) -> ChatMessage:
    calls = tuple(ToolCall(id=c.id, function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
                  for c in m.tool_calls or ())
    return ChatMessage(role="system" if m.role == "developer" else m.role, content=_text(m.content),
                       tool_calls=calls, tool_call_id=m.tool_call_id)


def _prompt_text(prompt: str | list[Any]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise FrameError("invalid_request", "prompt: one text per request (a list of texts, or token ids, is not "
                     "served)", param="prompt")


def _text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part.text for part in content)


class IgnoredFields:
    """Fields of a body that no one here knows: ignored, as vLLM does, and each name logged once
    (as vLLM does: its clients send extras of other servers) and counted. Names are the client's:
    only the first `most` distinct ones are remembered and get their own label."""

    def __init__(self, most: int = 64) -> None:
        self.most = most
        self.seen: set[str] = set()

    def note(self, name: str) -> tuple[str, bool]:
        """The metric label to count it under, and whether this is the first time (to log it). A
        name is as long as the client made it: its first 64 characters stand for it."""
        name = name[:64]
        if name in self.seen:
            return name, False
        if len(self.seen) >= self.most:
            return "other", False
        self.seen.add(name)
        return name, True


class TokenizeRequest(Struct, kw_only=True):
    """vLLM's /tokenize: a prompt, or messages under the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ApiMessage], Meta(max_length=4096)] | None = None
    add_special_tokens: bool | None = True  # for a prompt
    add_generation_prompt: bool | None = True  # for messages
    return_token_strs: bool | None = False


class TokenizeResponse(Struct, omit_defaults=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Struct, kw_only=True):
    tokens: Annotated[list[Annotated[int, Meta(ge=0, le=2**31 - 1)]], Meta(max_length=1 << 20)]
    model: str | None = None


class DetokenizeResponse(Struct):
    prompt: str


class Version(Struct):
    version: str


def package_version() -> str:
    try:
        return importlib.metadata.version("grokstack")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "0+unknown"


# ---------------------------------------------------------------------------- responses


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


def usage_of(event: FinalEvent) -> CompletionUsage:
    u = event.usage
    return CompletionUsage(u.prompt_tokens, u.completion_tokens, u.prompt_tokens + u.completion_tokens,
                           PromptTokensDetails(u.cached_prompt_tokens))


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

    def chunk(self, cid: str, created: int, model: str, event: TokenEvent, offset: int) -> ChatCompletionChunk:
        delta = Delta(role="assistant" if event.seq == 0 else None, content=event.text)
        return ChatCompletionChunk(cid, "chat.completion.chunk", created, model,
                                   [ChunkChoice(0, delta, logprobs=chat_logprobs(event.logprobs))])

    def finish_chunk(self, cid: str, created: int, model: str, event: FinalEvent) -> ChatCompletionChunk:
        return ChatCompletionChunk(cid, "chat.completion.chunk", created, model,
                                   [ChunkChoice(0, Delta(), finish_reason(event.finish_reason))])

    def usage_chunk(self, cid: str, created: int, model: str, event: FinalEvent,
                    info: GrokstackInfo) -> ChatCompletionChunk:
        return ChatCompletionChunk(cid, "chat.completion.chunk", created, model, [], usage=usage_of(event),
                                   grokstack=info)

    def whole(self, cid: str, created: int, model: str, tokens: list[TokenEvent], event: FinalEvent,
              info: GrokstackInfo) -> ChatCompletion:
        text = "".join(t.text for t in tokens)
        logprobs = _joined(tokens)
        return ChatCompletion(cid, "chat.completion", created, model,
                              [Choice(0, AssistantMessage("assistant", text), finish_reason(event.finish_reason),
                                      chat_logprobs(logprobs))], usage_of(event), info)


class TextShape:
    """The completions API's objects."""
    path = "/v1/completions"

    @staticmethod
    def id_of(request_id: str) -> str:
        return f"cmpl-{request_id}"

    def chunk(self, cid: str, created: int, model: str, event: TokenEvent, offset: int) -> TextCompletionChunk:
        return TextCompletionChunk(cid, "text_completion", created, model,
                                   [TextChoice(0, event.text, logprobs=text_logprobs(event.logprobs, offset))])

    def finish_chunk(self, cid: str, created: int, model: str, event: FinalEvent) -> TextCompletionChunk:
        return TextCompletionChunk(cid, "text_completion", created, model,
                                   [TextChoice(0, "", finish_reason(event.finish_reason))])

    def usage_chunk(self, cid: str, created: int, model: str, event: FinalEvent,
                    info: GrokstackInfo) -> TextCompletionChunk:
        return TextCompletionChunk(cid, "text_completion", created, model, [], usage=usage_of(event),
                                   grokstack=info)

    def whole(self, cid: str, created: int, model: str, tokens: list[TokenEvent], event: FinalEvent,
              info: GrokstackInfo) -> TextCompletion:
        text = "".join(t.text for t in tokens)
        return TextCompletion(cid, "text_completion", created, model,
                              [TextChoice(0, text, finish_reason(event.finish_reason),
                                          text_logprobs(_joined(tokens), 0))], usage_of(event), info)


Shape = Union[ChatShape, TextShape]


def shape_of(prompt_format: str) -> Shape:
    """The API a request came through, by how its prompt is made (ChatRequest.prompt_format)."""
    return TextShape() if prompt_format == "text" else ChatShape()


def _joined(tokens: list[TokenEvent]) -> list[TokenLogprob] | None:
    if not tokens or any(t.logprobs is None for t in tokens):
        return None
    return [lp for t in tokens for lp in t.logprobs or ()]


def final_chunks(shape: Shape, cid: str, created: int, model: str, event: FinalEvent, info: GrokstackInfo,
                 include_usage: bool) -> list[Struct]:
    """The finish chunk, then the usage chunk when asked for; the last one carries `grokstack`."""
    finish = shape.finish_chunk(cid, created, model, event)
    if not include_usage:
        finish.grokstack = info
        return [finish]
    return [finish, shape.usage_chunk(cid, created, model, event, info)]


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
