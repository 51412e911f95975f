"""The websocket frame protocol: JSON text frames, validated before anything is published.

Client -> edge
  {"type": "chat", "id": "c1", "messages": [{"role": "user", "content": "Hi"}],
   "max_tokens": 128, "temperature": 0.7, "top_p": 0.95, "stop": ["\\n\\n"], "seed": 7,
   "priority": "interactive", "region": "eu", "conversation_id": "conv-42"}
       and vLLM's other sampling fields (top_k, min_p, repetition_penalty, presence_penalty,
       frequency_penalty, ignore_eos, min_tokens, stop_token_ids, logit_bias, logprobs: n, ...)
       only "type" and "messages" are required; "id" names the request on this connection
       (the edge makes one up when it is missing) so several can be in flight at once.
  {"type": "cancel", "id": "c1"}
  {"type": "resume", "id": "c1", "request_id": "…", "resume_token": "…", "last_seq": 17}
       after a dropped connection (on this or a new one, of any edge of any region): the edge
       sends the events after `last_seq` (-1: from the start; at most MAX_SEQ), then the rest,
       as for the original request; a stream always ends with its final (done or error) frame,
       even when `last_seq` is past it. `resume_token` is the one the request's `accepted` frame
       carried (edge/resume.py): without the right one the answer is that of an unknown id.
       Resumes are rate-limited per connection and per tenant ("rate_limited", retry_after_s).

Edge -> client
  {"type": "accepted", "id": "c1", "request_id": "…", "resume_token": "…", "resumed": false}
       the request is on the bus; keep the token to resume it (it is the only credential for
       that: the request id is not one); with "max_tokens": 64 when the edge capped the
       request's max_tokens (batch under load)
  {"type": "token", "id": "c1", "seq": 0, "text": "Hel", "tokens": 1}   in order, no gaps, no repeats
       (with "logprobs": [[text, logprob, [[text, logprob], ...]], ...] when the chat asked for them)
  {"type": "done", "id": "c1", "finish_reason": "stop", "usage": {…}, "timings": {…}, "kv": {…},
   "cost": {"prefill_gpu_s": …, "decode_gpu_s": …, "usd": …}}
  {"type": "error", "id": "c1" | null, "code": "invalid_request", "message": "…", "retryable": false}
       refusals at admission ("overloaded", "rate_limited", "too_many_requests") also carry
       "retry_after_s": seconds after which a retry is likely to be accepted.

Every number a client sends is bounded here: counts and lengths by the EdgeConfig limits,
`temperature` in [0, 2], `top_p` in (0, 1] (NaN and infinities fail both), `seed` in
[0, 2**63 - 1] (vLLM's range), `last_seq` in [-1, MAX_SEQ].

Error codes are stable (see `ErrorCode`); messages are for humans and may change.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct

from bus.messages import ChatMessage, Cost, FinalEvent, KvTransfer, SamplingSpec, Speculation, Timings, TokenLogprob
from bus.priorities import PRIORITIES, Priority
from edge.config import EdgeConfig

ErrorCode = Literal[
    "invalid_json",  # the frame is not JSON
    "invalid_frame",  # not an object with a known "type", or a field is missing or mistyped
    "frame_too_large",
    "invalid_request",  # a value is out of range, or the prompt is empty or too long
    "prompt_too_long",  # the prompt does not fit the model's context (found by prefill)
    "duplicate_id",  # a request with this id is already in flight on this connection
    "unknown_id",  # cancel of a request this connection does not have
    "unknown_request",  # resume of a request this edge does not hold (any more), or with a wrong token
    "unauthorized",  # no valid API key
    "forbidden",  # the tenant may not use this priority
    "too_many_requests",  # too many requests in flight on this connection, edge or tenant
    "overloaded",  # the priority's estimated queue wait is over its budget: retry after retry_after_s
    "rate_limited",  # the tenant used its tokens per minute, or resumes too often: retry after retry_after_s
    "unavailable",  # the bus did not accept the request; retry
    "timeout",  # no answer in time; the request was cancelled
    "cancelled",
    "stream_gap",  # token events were lost on the way; the request was cancelled
    "internal",
]

ClientId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
ResumeToken = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# The highest event sequence number a client may name: far above any request's events (one per
# token at most, max_tokens_limit of them), far below what would cost anything to handle.
MAX_SEQ = 1_000_000
MAX_SEED = 2**63 - 1  # vLLM takes a seed up to a signed 64-bit integer and fails beyond


class ChatFrame(Struct, tag="chat", tag_field="type", forbid_unknown_fields=True):
    messages: list[ChatMessage]
    id: ClientId | None = None
    max_tokens: int | None = None
    # None: the model's default (its generation config, as vLLM), else vLLM's neutral one
    temperature: float | None = None
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    priority: Priority | None = None  # None: the tenant's most urgent allowed priority
    conversation_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    region: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None  # None: the edge's own
    # vLLM's other sampling parameters, bounded as SamplingSpec's (bus/messages.py) say
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] = {}
    logprobs: int | None = None  # with this many most likely alternatives per token
    # "text": the one message's text is the prompt as it is, without the chat template
    prompt_format: Literal["chat", "text"] = "chat"


class CancelFrame(Struct, tag="cancel", tag_field="type", forbid_unknown_fields=True):
    id: ClientId


class ResumeFrame(Struct, tag="resume", tag_field="type", forbid_unknown_fields=True):
    id: ClientId
    request_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    resume_token: ResumeToken
    last_seq: Annotated[int, Meta(ge=-1, le=MAX_SEQ)] = -1


ClientFrame = Union[ChatFrame, CancelFrame, ResumeFrame]
_FRAME_TYPES = {"chat": ChatFrame, "cancel": CancelFrame, "resume": ResumeFrame}


class UsageFrame(Struct):
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    total_ms: float
    region: str = ""  # the region that served it
    route: str = ""  # why that region (edge/routing.py)


class AcceptedFrame(Struct, tag="accepted", tag_field="type", omit_defaults=True):
    id: str
    request_id: str
    resumed: bool
    resume_token: str = ""  # what a resume of this request must carry
    # Under load a batch request's max_tokens is capped (edge/admission.py): to this.
    max_tokens: int | None = None
    region: str | None = None  # the region chosen to serve it
    route: str | None = None  # why: home, requested, sticky, overflow or failover (edge/routing.py)
    estimated_wait_s: float | None = None  # the queue wait admission judged it by (edge/queues.py)


class TokenFrame(Struct, tag="token", tag_field="type", omit_defaults=True):
    id: str
    seq: int
    text: str
    tokens: int  # how many tokens this frame carries (several when speculation is accepted)
    # One per token, when the chat frame asked for them ("logprobs": n alternatives):
    # [text, log probability, [[alternative's text, its log probability], ...]]
    logprobs: list[TokenLogprob] | None = None


class DoneFrame(Struct, tag="done", tag_field="type"):
    id: str
    finish_reason: str
    usage: UsageFrame
    timings: Timings
    kv: KvTransfer
    cost: Cost
    speculation: Speculation


class ErrorFrame(Struct, tag="error", tag_field="type", omit_defaults=True):
    id: str | None
    code: str
    message: str
    retryable: bool
    retry_after_s: float | None = None  # sent only with refusals at admission


ServerFrame = Union[AcceptedFrame, TokenFrame, DoneFrame, ErrorFrame]


class FrameError(ValueError):
    def __init__(self, code: str, message: str, id: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.param = param  # the field at fault, when the message does not say it as `$.field`


_encoder = msgspec.json.Encoder()
# Numbers too large for a double (1e999) read as infinities, so the field's own check names the
# field; msgspec's untyped decoder would refuse them with no name ("Number out of range - at $[...]").
_decoder = msgspec.json.Decoder(float_hook=float)


def encode_frame(frame: ServerFrame) -> str:
    return _encoder.encode(frame).decode()


def parse_frame(raw: str | bytes, limits: EdgeConfig) -> ClientFrame:
    """A validated client frame, or FrameError naming what is wrong."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > limits.max_frame_bytes:
        raise FrameError("frame_too_large", f"the frame is {size} bytes; the limit is {limits.max_frame_bytes}")
    try:
        obj: Any = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise FrameError("invalid_json", f"the frame is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec raises it for bad bytes inside a JSON string
        raise FrameError("invalid_json", f"the frame is not valid UTF-8: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise FrameError("invalid_frame", 'a frame is a JSON object with a string "type" field')
    client_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    kind = _FRAME_TYPES.get(obj["type"])
    if kind is None:
        raise FrameError("invalid_frame", f"unknown frame type {obj['type']!r}; expected one of "
                         f"{', '.join(_FRAME_TYPES)}", client_id)
    try:
        frame = msgspec.convert(obj, type=kind)
    except msgspec.ValidationError as exc:
        raise FrameError("invalid_frame", str(exc), client_id) from None
    if isinstance(frame, ChatFrame):
        check_chat(frame, limits)
    return frame


def prompt_chars(messages: list[ChatMessage]) -> int:
    """The characters of a history that the prompt is made of (its contents and tool calls),
    bounded by max_prompt_chars."""
    return sum(len(m.content) + sum(len(c.function.name) + len(c.function.arguments) for c in m.tool_calls)
               for m in messages)


def check_chat(frame: ChatFrame, limits: EdgeConfig) -> None:
    def bad(message: str) -> FrameError:
        return FrameError("invalid_request", message, frame.id)

    if not frame.messages:
        raise bad("messages must hold at least one message")
    if len(frame.messages) > limits.max_messages:
        raise bad(f"{len(frame.messages)} messages; the limit is {limits.max_messages}")
    chars = prompt_chars(frame.messages)
    if chars > limits.max_prompt_chars:
        raise bad(f"the messages hold {chars} characters; the limit is {limits.max_prompt_chars}")
    if not any(m.content.strip() for m in frame.messages):
        raise bad("the prompt is empty: every message's content is blank")
    if frame.max_tokens is not None and not 1 <= frame.max_tokens <= limits.max_tokens_limit:
        raise bad(f"max_tokens must be between 1 and {limits.max_tokens_limit}, got {frame.max_tokens}")
    if frame.temperature is not None and not 0.0 <= frame.temperature <= 2.0:
        raise bad(f"temperature must be between 0 and 2, got {frame.temperature}")
    if frame.top_p is not None and not 0.0 < frame.top_p <= 1.0:
        raise bad(f"top_p must be greater than 0 and at most 1, got {frame.top_p}")
    if frame.seed is not None and not 0 <= frame.seed <= MAX_SEED:
        raise bad(f"seed must be between 0 and {MAX_SEED} (2**63 - 1), got {frame.seed}")
    stops = stop_list(frame)
    if len(stops) > 8 or any(not 1 <= len(s) <= 64 for s in stops):
        raise bad("stop takes at most 8 strings of 1 to 64 characters")
    if frame.prompt_format == "text" and len(frame.messages) != 1:
        raise bad(f"a text prompt is one message, not {len(frame.messages)}")
    sampling_of(frame, limits)
    if frame.priority is not None and frame.priority not in PRIORITIES:  # the type guards it too
        raise bad(f"priority must be one of {', '.join(PRIORITIES)}")


def sampling_of(frame: ChatFrame, limits: EdgeConfig, count_prompt: bool = False) -> SamplingSpec:
    """The frame's sampling parameters as the bus carries them, each checked against the range
    vLLM takes (FrameError naming the field otherwise); `count_prompt`: SamplingSpec's."""
    spec = SamplingSpec(
        max_tokens=frame.max_tokens or limits.default_max_tokens, temperature=frame.temperature, top_p=frame.top_p,
        stop=stop_list(frame), seed=frame.seed, top_k=frame.top_k, min_p=frame.min_p,
        repetition_penalty=frame.repetition_penalty, presence_penalty=frame.presence_penalty,
        frequency_penalty=frame.frequency_penalty, ignore_eos=frame.ignore_eos, min_tokens=frame.min_tokens,
        stop_token_ids=frame.stop_token_ids, include_stop_str_in_output=frame.include_stop_str_in_output,
        skip_special_tokens=frame.skip_special_tokens,
        spaces_between_special_tokens=frame.spaces_between_special_tokens, logit_bias=frame.logit_bias,
        logprobs=frame.logprobs, count_prompt=count_prompt)
    try:  # a Struct's constructor does not check its constraints; a conversion does
        return msgspec.convert(msgspec.to_builtins(spec), SamplingSpec, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        name = message.split("`$.", 1)[1].split("`", 1)[0].split("[", 1)[0] if "`$." in message else "sampling"
        raise FrameError("invalid_request", f"{name}: {message}", frame.id) from None


def stop_list(frame: ChatFrame) -> list[str]:
    if frame.stop is None:
        return []
    return [frame.stop] if isinstance(frame.stop, str) else list(frame.stop)


def usage_frame(event: FinalEvent, ttft_ms: float, total_ms: float, region: str = "",
                route: str = "") -> UsageFrame:
    u = event.usage
    return UsageFrame(u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens, round(ttft_ms, 2),
                      round(total_ms, 2), region, route)
