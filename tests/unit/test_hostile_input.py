"""Property-based tests over every external parser: websocket frames, OpenAI HTTP bodies and
messages published on the bus. Whatever arrives, the parser returns a valid value or raises its
one documented error (which names the problem); nothing else escapes to crash a handler."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bus.codec import BadMessage, decode, decode_event, encode, reply_route
from bus.messages import AnyMessage, ChatMessage, ChatRequest, SamplingSpec
from edge.openai_wire import parse_request
from edge.config import EdgeConfig
from edge.protocol import MAX_SEQ, FrameError, parse_frame

LIMITS = EdgeConfig(max_frame_bytes=4096, max_messages=8, max_prompt_chars=2000, max_tokens_limit=512,
                default_max_tokens=64)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=30)
FIELDS = ["type", "id", "messages", "role", "content", "max_tokens", "temperature", "top_p", "stop", "seed",
          "priority", "region", "conversation_id", "request_id", "last_seq", "model", "stream", "n", "v",
          "sampling", "reply_to", "created_at", "deadline", "seq", "text", "token_ids", "usage"]
# objects shaped like the real ones (known keys, known type tags) with any values, so the
# fuzzer gets past the first checks and into the field validation
shaped = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=10)
tagged = st.builds(lambda d, t: {**d, "type": t}, shaped,
                   st.sampled_from(["chat", "cancel", "resume", "chat_request", "decode_job", "token", "final",
                                    "error", "cancel", "heartbeat", "dead_letter", "nope"]))
as_json = st.one_of(json_values, shaped, tagged).map(lambda v: json.dumps(v).encode())


def _splice(raw: bytes, junk: bytes, at: int) -> bytes:
    at %= len(raw) + 1
    return raw[:at] + junk + raw[at:]


# valid JSON with a few raw bytes spliced in: inside a string they make invalid UTF-8, which the
# JSON decoder reports with a different exception than bad syntax
spliced = st.builds(_splice, as_json, st.binary(min_size=1, max_size=3), st.integers(0, 10**6))
payloads = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode), as_json, spliced)


@pytest.mark.parametrize("parse", [parse_frame, parse_request], ids=["websocket frame", "openai body"])
@FAST
@given(raw=payloads)
def test_client_input_parses_or_fails_with_a_frame_error(parse, raw):
    try:
        parse(raw, LIMITS)
    except FrameError as exc:
        assert exc.code and exc.message


@FAST
@given(payloads)
def test_bus_messages_decode_or_fail_with_bad_message(raw):
    for read in (lambda b: decode(b, AnyMessage), decode_event, reply_route):
        try:
            read(raw)
        except BadMessage as exc:
            assert exc.reason


def _request() -> dict:
    good = ChatRequest(request_id="r1", region="local", priority="standard",
                       messages=[ChatMessage(role="user", content="hi")],
                       sampling=SamplingSpec(max_tokens=8), reply_to="gs.evt.c.r1")
    return msgspec.json.decode(encode(good))


@FAST
@given(st.sampled_from(sorted(_request())), json_values)
def test_a_valid_job_with_one_field_replaced_decodes_or_names_the_problem(field, value):
    raw = json.dumps({**_request(), field: value}).encode()
    try:
        decode(raw, AnyMessage)
    except BadMessage as exc:
        assert exc.reason


# ---------------------------------------------------------------------------- numeric extremes

BASE_FRAME = {"type": "chat", "messages": [{"role": "user", "content": "hi"}]}
NUMBERS = st.one_of(st.integers(-2**130, 2**130), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**6, 10**6 + 1, 1e-300, 5e-324]))
# each numeric field, and whether a value is in its documented range (edge/protocol.py)
IN_RANGE = {
    "seed": lambda v: isinstance(v, int) and 0 <= v <= 2**63 - 1,
    "max_tokens": lambda v: isinstance(v, int) and 1 <= v <= LIMITS.max_tokens_limit,
    "temperature": lambda v: 0 <= v <= 2,
    "top_p": lambda v: 0 < v <= 1,
}


@FAST
@given(st.sampled_from(sorted(IN_RANGE)), NUMBERS)
def test_every_client_number_is_taken_in_range_and_refused_out_of_it_naming_the_field(field, value):
    """At both doors: a number in its range is accepted as given; any other (too big for 64 bits,
    negative, NaN, infinite) is a FrameError naming the field, never a value passed on."""
    assume(value == value)  # NaN: JSON cannot say it (and msgspec does not read Python's NaN)

    def dumps(obj: dict) -> bytes:  # infinities as a JSON number too large for a double
        return json.dumps(obj).replace("-Infinity", "-1e999").replace("Infinity", "1e999").encode()
    raw_frame = dumps({**BASE_FRAME, field: value})
    body = dumps({"model": "m", "messages": BASE_FRAME["messages"], field: value})
    for door, parse, raw in (("frame", parse_frame, raw_frame), ("body", parse_request, body)):
        try:
            parsed = parse(raw, LIMITS)
        except FrameError as exc:
            assert not IN_RANGE[field](value), (door, field, value, exc.message)
            assert field in exc.message, (door, field, value, exc.message)
        else:
            frame = parsed if door == "frame" else parsed[1]
            assert IN_RANGE[field](value), (door, field, value)
            assert getattr(frame, field) == value


@FAST
@given(st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                 st.text(max_size=8), st.none()))
def test_a_resume_frames_last_seq_is_an_integer_from_minus_one_to_max_seq(last_seq):
    raw = json.dumps({"type": "resume", "id": "r", "request_id": "abc", "resume_token": "t" * 22,
                      "last_seq": last_seq}).encode()
    try:
        frame = parse_frame(raw, LIMITS)
    except FrameError as exc:
        assert exc.code == "invalid_frame" and "last_seq" in exc.message
        assert not (isinstance(last_seq, int) and -1 <= last_seq <= MAX_SEQ) or isinstance(last_seq, bool)
    else:
        assert isinstance(last_seq, int) and -1 <= last_seq <= MAX_SEQ and frame.last_seq == last_seq
