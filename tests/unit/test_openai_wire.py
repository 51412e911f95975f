"""OpenAI request parsing and chunk building: pure functions, no sockets."""

from __future__ import annotations

import msgspec
import pytest

from bus.messages import FinalEvent, TokenEvent, Usage
from edge.openai_wire import error_body, final_chunks, info_of, param_of, parse_request, token_chunk
from edge.config import EdgeConfig
from edge.protocol import FrameError, UsageFrame

LIMITS = EdgeConfig(max_frame_bytes=4096, max_messages=8, max_prompt_chars=1000, max_tokens_limit=512,
                default_max_tokens=64)


def body(**fields) -> bytes:
    return msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_content_parts_developer_role_and_max_completion_tokens_map_onto_a_chat_frame():
    request, frame = parse_request(body(
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_tokens=10, max_completion_tokens=20, temperature=0, stop="\n", priority="batch", region="eu"), LIMITS)
    assert [(m.role, m.content) for m in frame.messages] == [("system", "be brief"), ("user", "ab")]
    assert (frame.max_tokens, frame.temperature, frame.stop, frame.priority, frame.region) == (20, 0.0, "\n", "batch",
                                                                                            "eu")
    assert request.stream is False


@pytest.mark.parametrize("fields, code, param", [
    ({"n": 3}, "invalid_request", "n"),
    ({"tools": [{"type": "function"}]}, "invalid_request", "tools"),
    ({"presence_penalty": 0.5}, "invalid_request", "presence_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "invalid_request",
     "messages"),
    ({"region": "eu.west"}, "invalid_request", "region"),
    ({"max_tokens": 100000}, "invalid_request", "max_tokens"),
    ({"unknown": True}, "invalid_request", "unknown"),
])
def test_unsupported_or_bad_fields_name_the_field(fields, code, param):
    with pytest.raises(FrameError) as caught:
        parse_request(body(**fields), LIMITS)
    assert caught.value.code == code and param_of(caught.value.message) == param, caught.value.message


def test_an_oversize_body_is_refused_by_size_before_parsing():
    with pytest.raises(FrameError) as caught:
        parse_request(b"{" * 5000, LIMITS)
    assert caught.value.code == "frame_too_large"


def test_chunks_role_first_then_finish_then_usage_with_the_grokstack_details_last():
    first = token_chunk("chatcmpl-x", 1, "m", TokenEvent(request_id="x", seq=0, text="He", token_ids=[1]))
    later = token_chunk("chatcmpl-x", 1, "m", TokenEvent(request_id="x", seq=1, text="y", token_ids=[2]))
    assert first.choices[0].delta.role == "assistant" and later.choices[0].delta.role is None
    assert msgspec.json.decode(msgspec.json.encode(later))["choices"][0]["delta"] == {"content": "y"}
    final = FinalEvent(request_id="x", seq=2, finish_reason="length",
                       usage=Usage(prompt_tokens=5, cached_prompt_tokens=2, completion_tokens=2))
    info = info_of("x", final, UsageFrame(5, 2, 2, 10.0, 20.0))
    finish, usage = final_chunks("chatcmpl-x", 1, "m", final, info, include_usage=True)
    assert finish.choices[0].finish_reason == "length" and finish.grokstack is None
    assert usage.choices == [] and usage.usage.total_tokens == 7
    assert usage.usage.prompt_tokens_details.cached_tokens == 2
    assert usage.grokstack.usage.ttft_ms == 10.0
    (only,) = final_chunks("chatcmpl-x", 1, "m", final, info, include_usage=False)
    assert only.usage is None and only.grokstack is info


def test_error_codes_map_to_http_statuses():
    assert error_body("too_many_requests", "m")[0] == 429
    assert error_body("frame_too_large", "m")[0] == 413
    assert error_body("unavailable", "m")[0] == 503
    assert error_body("unauthorized", "m")[1].error.type == "authentication_error"
    assert error_body("something_new", "m")[0] == 500
