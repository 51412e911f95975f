"""The OpenAI API as clients send it: the request bodies of the chat-completions and completions
APIs (and vLLM's /tokenize, /detokenize), and the pure functions from them to the stack's own
chat frames. No sockets here; what goes back is edge/openai_responses.py.

A body takes every field vLLM's does: what is served becomes the chat frame's (then checked as a
websocket chat frame is, so both doors take the same input), what vLLM knows but this server
cannot honour is refused unless at its default (NOT_SERVED), and a field no one knows is ignored
and reported (IgnoredFields). Extensions: `priority`, `region` and `conversation_id`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Union

import msgspec
from msgspec import Meta, Struct

from bus.messages import MAX_LOGPROBS, ChatMessage, FunctionCall, ToolCall
from bus.priorities import Priority
from edge.config import EdgeConfig
from edge.protocol import MAX_SEED, ChatFrame, FrameError, check_chat, prompt_chars


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
    logprob_token_ids: list[int] | None = None
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_offsets: bool | None = False
    thinking_token_budget: int | None = None
    repetition_detection: msgspec.Raw | None = None
    watermarking: bool | None = None
    cache_salt: str | None = None
    vllm_xargs: msgspec.Raw | None = None
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
    reasoning_effort: str | None = None
    return_prompt_text: bool | None = None
    add_special_tokens: bool | None = False
    # vLLM's defaults of the fields above that differ by API
    defaults: ClassVar[dict[str, tuple[object, ...]]] = {"add_special_tokens": (None, False)}


class CompletionRequest(SamplingBody, kw_only=True):
    # A text, or a list holding one (several prompts per request, or token ids, are not served).
    prompt: Union[str, Annotated[list[Any], Meta(max_length=1)]]
    logprobs: int | None = None
    suffix: str | None = None
    prompt_embeds: msgspec.Raw | None = None
    add_special_tokens: bool | None = True
    defaults: ClassVar[dict[str, tuple[object, ...]]] = {"add_special_tokens": (None, True)}


AnyRequest = Union[ChatCompletionRequest, CompletionRequest]

# vLLM's fields this server cannot honour: a value other than the default would get an answer
# that is not what was asked (or, cache_salt, a cache isolation not given), so it is refused with a
# 400 naming the field. Those it may ignore (no effect on a text model's answer here: request_id,
# session_id, kv_transfer_params, truncation_side, include_reasoning, mm_processor_kwargs ...) are
# ignored as unknown fields are.
NOT_SERVED: dict[str, tuple[object, ...]] = {
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
    "prompt_embeds": (None,),
    "logprob_token_ids": (None, []),
    "return_token_ids": (None, False),
    "return_tokens_as_token_ids": (None, False),
    "return_token_offsets": (None, False),
    "return_prompt_text": (None, False),
    "thinking_token_budget": (None,),
    "reasoning_effort": (None,),  # vLLM hands it to the chat template
    "repetition_detection": (None,),
    "watermarking": (None, False),
    "cache_salt": (None,),
    "vllm_xargs": (None,),
}
MAX_CHOICES = 16  # `n`: each choice is a request of its own in the queues


def not_served(kind: type[AnyRequest]) -> dict[str, tuple[object, ...]]:
    """The fields `kind` takes at their default only, with those defaults."""
    return {name: NOT_SERVED[name] for name in NOT_SERVED if name in kind.__struct_fields__} | kind.defaults


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
        if request.top_logprobs and not request.logprobs:  # as vLLM
            raise FrameError("invalid_request", "when using top_logprobs, logprobs must be set to true",
                             param="top_logprobs")
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
            # unset (None): the model's default, as vLLM (bus/messages.py SamplingSpec)
            temperature=request.temperature, top_p=request.top_p, stop=request.stop, seed=request.seed,
            priority=request.priority if isinstance(request.priority, str) else None,
            conversation_id=request.conversation_id, region=request.region,
            top_k=request.top_k, min_p=request.min_p, repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
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


def choice_frames(frame: ChatFrame, n: int) -> list[ChatFrame]:
    """One chat frame per choice (`n`), each a request of its own. With a seed, choice i samples
    with seed + i, as vLLM's parallel sampling does: the choices differ, each reproducible."""
    if n == 1 or frame.seed is None:
        return [frame] * n
    return [msgspec.structs.replace(frame, seed=(frame.seed + i) % (MAX_SEED + 1)) for i in range(n)]


def _refuse_not_served(request: AnyRequest) -> None:
    for name, defaults in not_served(type(request)).items():
        value = getattr(request, name)
        if value not in defaults:
            raise FrameError("invalid_request", f"{name} is not served by this server (vLLM's field; only its "
                             f"default is taken here, got {_short(value)})", param=name)
    if request.response_format is not None and request.response_format.type != "text":
        raise FrameError("invalid_request", f"response_format {request.response_format.type!r} is not served "
                         "(structured output): only 'text'", param="response_format")
    if request.n is not None and not 1 <= request.n <= MAX_CHOICES:
        raise FrameError("invalid_request", f"n must be between 1 and {MAX_CHOICES}, got {request.n}", param="n")
    if isinstance(request.priority, int) and request.priority != 0:
        raise FrameError("invalid_request", "priority as a number (vLLM's scheduling priority) is taken at 0 only; "
                         "this server's priorities are interactive, standard and batch", param="priority")
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
    chars = prompt_chars(out)
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


class DetokenizeRequest(Struct, kw_only=True):
    tokens: Annotated[list[Annotated[int, Meta(ge=0, le=2**31 - 1)]], Meta(max_length=1 << 20)]
    model: str | None = None


def continuous_usage(request: AnyRequest) -> bool:
    """Usage on every streamed chunk: stream_options.continuous_usage_stats, with include_usage
    (as vLLM takes them)."""
    options = request.stream_options
    return bool(request.stream and options and options.include_usage and options.continuous_usage_stats)
