"""OpenAI request parsing and chunk building: pure functions, no sockets."""

from __future__ import annotations

import msgspec
import pytest

from bus.messages import FinalEvent, TokenEvent, Usage
from bus.messages import TokenLogprob, TopLogprob
from edge.openai_responses import Answer, ChatShape, StreamEnd, TextShape, error_body, info_of, param_of
from edge.openai_wire import MAX_CHOICES, CompletionRequest, choice_frames, parse_request
from edge.config import EdgeConfig
from edge.protocol import FrameError, UsageFrame

LIMITS = EdgeConfig(max_frame_bytes=4096, max_messages=8, max_prompt_chars=1000, max_tokens_limit=512,
                default_max_tokens=64)


def body(**fields) -> bytes:
    return msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_content_parts_developer_role_and_max_completion_tokens_map_onto_a_chat_frame():
    request, frame, _ = parse_request(body(
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_tokens=10, max_completion_tokens=20, temperature=0, stop="\n", priority="batch", region="eu"), LIMITS)
    assert [(m.role, m.content) for m in frame.messages] == [("system", "be brief"), ("user", "ab")]
    assert (frame.max_tokens, frame.temperature, frame.stop, frame.priority, frame.region) == (20, 0.0, "\n", "batch",
                                                                                            "eu")
    assert request.stream is False


@pytest.mark.parametrize("fields, code, param", [
    ({"n": 0}, "invalid_request", "n"),
    ({"n": MAX_CHOICES + 1}, "invalid_request", "n"),
    ({"top_logprobs": 2}, "invalid_request", "top_logprobs"),  # without logprobs: as vLLM
    ({"return_token_ids": True}, "invalid_request", "return_token_ids"),
    ({"logprobs": True, "logprob_token_ids": [5]}, "invalid_request", "logprob_token_ids"),
    ({"add_special_tokens": True}, "invalid_request", "add_special_tokens"),  # the chat API's default: false
    ({"reasoning_effort": "low"}, "invalid_request", "reasoning_effort"),
    ({"thinking_token_budget": 10}, "invalid_request", "thinking_token_budget"),
    ({"cache_salt": "tenant-a"}, "invalid_request", "cache_salt"),
    ({"vllm_xargs": {"a": 1}}, "invalid_request", "vllm_xargs"),
    ({"repetition_detection": {"max_pattern_size": 4}}, "invalid_request", "repetition_detection"),
    ({"tools": [{"type": "function"}]}, "invalid_request", "tools"),
    ({"use_beam_search": True}, "invalid_request", "use_beam_search"),
    ({"response_format": {"type": "json_object"}}, "invalid_request", "response_format"),
    ({"continue_final_message": True}, "invalid_request", "continue_final_message"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "invalid_request", "chat_template_kwargs"),
    ({"presence_penalty": 2.5}, "invalid_request", "presence_penalty"),
    ({"top_k": -2}, "invalid_request", "top_k"),
    ({"min_p": 1.5}, "invalid_request", "min_p"),
    ({"repetition_penalty": 0}, "invalid_request", "repetition_penalty"),
    ({"logprobs": True, "top_logprobs": 21}, "invalid_request", "top_logprobs"),
    ({"logit_bias": {"x": 1}}, "invalid_request", "logit_bias"),
    ({"logit_bias": {"5": 101}}, "invalid_request", "logit_bias"),
    ({"priority": 3}, "invalid_request", "priority"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "invalid_request",
     "messages"),
    ({"region": "eu.west"}, "invalid_request", "region"),
    ({"max_tokens": 100000}, "invalid_request", "max_tokens"),
])
def test_fields_that_cannot_be_honoured_or_are_out_of_range_name_the_field(fields, code, param):
    with pytest.raises(FrameError) as caught:
        parse_request(body(**fields), LIMITS)
    assert caught.value.code == code and (caught.value.param or param_of(caught.value.message)) == param, \
        caught.value.message


def test_every_field_vllm_clients_send_at_its_default_is_accepted_and_unknown_ones_are_reported():
    """What vLLM's benchmark, LangChain and LiteLLM send (null where they mean 'unset')."""
    request, frame, ignored = parse_request(body(
        top_k=-1, min_p=0.05, repetition_penalty=1.1, ignore_eos=True, logprobs=None, top_logprobs=None, n=None,
        presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"7": -100}, min_tokens=2, stop_token_ids=[2],
        stream_options={"include_usage": True, "continuous_usage_stats": False}, tool_choice=None, tools=None,
        priority=0, request_id="client-id", echo=False, use_beam_search=False, add_generation_prompt=True,
        add_special_tokens=False, return_token_ids=None, cache_salt=None, kv_transfer_params=None,
        response_format={"type": "text"}, parallel_tool_calls=True, service_tier="auto", my_extension={"x": 1},
        messages=[{"role": "user", "content": "what's the weather?"},
                  {"role": "assistant", "content": None, "refusal": None,
                   "tool_calls": [{"id": "c1", "type": "function",
                                   "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "12 C"}]), LIMITS)
    assert sorted(ignored) == ["kv_transfer_params", "my_extension", "request_id", "service_tier"]
    assert (frame.top_k, frame.min_p, frame.repetition_penalty, frame.ignore_eos, frame.logprobs) == (
        -1, 0.05, 1.1, True, None)
    assert (frame.presence_penalty, frame.frequency_penalty, frame.logit_bias, frame.min_tokens,
            frame.stop_token_ids) == (0.5, -0.5, {7: -100.0}, 2, [2])
    assert frame.priority is None  # vLLM's 0: the tenant's default
    assistant, tool = frame.messages[1], frame.messages[2]
    assert assistant.tool_calls[0].function.arguments == '{"city": "Oslo"}' and assistant.content == ""
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "c1", "12 C")
    assert tool.as_template_input() == {"role": "tool", "content": "12 C", "tool_call_id": "c1"}


def test_logprobs_ask_for_top_logprobs_alternatives_and_completions_take_a_count():
    assert parse_request(body(logprobs=True, top_logprobs=3), LIMITS).frame.logprobs == 3
    assert parse_request(body(logprobs=True), LIMITS).frame.logprobs == 0
    assert parse_request(body(logprobs=False, top_logprobs=0), LIMITS).frame.logprobs is None
    text = msgspec.json.encode({"model": "m", "prompt": "Once upon", "logprobs": 2, "max_tokens": 5})
    request, frame, _ = parse_request(text, LIMITS, CompletionRequest)
    assert (frame.logprobs, frame.prompt_format, frame.max_tokens) == (2, "text", 5)
    assert [(m.role, m.content) for m in frame.messages] == [("user", "Once upon")]
    default = parse_request(msgspec.json.encode({"model": "m", "prompt": ["x"]}), LIMITS, CompletionRequest)
    assert default.frame.max_tokens == 16  # OpenAI's and vLLM's default for completions
    assert parse_request(msgspec.json.encode({"prompt": "x", "add_special_tokens": True}), LIMITS,
                         CompletionRequest).frame.prompt_format == "text"  # the completions API's default
    for bad, name in (({"prompt": [1, 2]}, "prompt"), ({"prompt": "x", "echo": True}, "echo"),
                      ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "best_of": 2}, "best_of"),
                      ({"prompt": "x", "add_special_tokens": False}, "add_special_tokens"),
                      ({"prompt": "x", "prompt_embeds": "AAAA"}, "prompt_embeds")):
        with pytest.raises(FrameError) as caught:
            parse_request(msgspec.json.encode({"model": "m", **bad}), LIMITS, CompletionRequest)
        assert (caught.value.param or param_of(caught.value.message)) == name, caught.value.message


def test_an_oversize_body_is_refused_by_size_before_parsing():
    with pytest.raises(FrameError) as caught:
        parse_request(b"{" * 5000, LIMITS)
    assert caught.value.code == "frame_too_large"


def test_chunks_role_first_then_finish_then_usage_with_the_grokstack_details_last():
    chat = ChatShape()
    first = chat.chunk("chatcmpl-x", 1, "m", TokenEvent(request_id="x", seq=0, text="He", token_ids=[1]), 0)
    later = chat.chunk("chatcmpl-x", 1, "m", TokenEvent(request_id="x", seq=1, text="y", token_ids=[2]), 2)
    assert first.choices[0].delta.role == "assistant" and later.choices[0].delta.role is None
    assert msgspec.json.decode(msgspec.json.encode(later))["choices"][0]["delta"] == {"content": "y"}
    final = FinalEvent(request_id="x", seq=2, finish_reason="length",
                       usage=Usage(prompt_tokens=5, cached_prompt_tokens=2, completion_tokens=2))
    info = info_of("x", final, UsageFrame(5, 2, 2, 10.0, 20.0))
    finish, usage = StreamEnd(chat, "chatcmpl-x", 1, "m", 1, include_usage=True).finished(0, final, info)
    assert finish.choices[0].finish_reason == "length" and finish.grokstack is None
    assert usage.choices == [] and usage.usage.total_tokens == 7
    assert usage.usage.prompt_tokens_details.cached_tokens == 2
    assert usage.grokstack.usage.ttft_ms == 10.0
    (only,) = StreamEnd(chat, "chatcmpl-x", 1, "m", 1, include_usage=False).finished(0, final, info)
    assert only.usage is None and only.grokstack is info


def test_several_choices_each_finish_with_their_details_and_share_one_usage_chunk():
    """n > 1: the prompt counted once, the completions summed (as vLLM counts them)."""
    end = StreamEnd(TextShape(), "cmpl-x", 1, "m", 2, include_usage=True)
    finals = [FinalEvent(request_id=r, seq=k, finish_reason="stop",
                         usage=Usage(prompt_tokens=5, cached_prompt_tokens=c, completion_tokens=k))
              for r, k, c in (("a", 3, 4), ("b", 2, 0))]
    infos = [info_of(f.request_id, f, UsageFrame(5, 0, f.usage.completion_tokens, 1.0, 2.0)) for f in finals]
    (second_done,) = end.finished(1, finals[1], infos[1])
    assert second_done.choices[0].index == 1 and second_done.grokstack is infos[1]
    first_done, usage = end.finished(0, finals[0], infos[0])
    assert first_done.choices[0].index == 0 and first_done.grokstack is infos[0]
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens, usage.usage.total_tokens) == (5, 5, 10)
    assert usage.usage.prompt_tokens_details.cached_tokens == 4 and usage.grokstack is None
    tokens = [[TokenEvent(request_id="a", seq=0, text="x", token_ids=[1])],
              [TokenEvent(request_id="b", seq=0, text="y", token_ids=[2])]]
    whole = ChatShape().whole("c", 1, "m", [Answer(t, f) for t, f in zip(tokens, finals, strict=True)], infos[0])
    assert [(c.index, c.message.content) for c in whole.choices] == [(0, "x"), (1, "y")]
    assert whole.usage.completion_tokens == 5


def test_with_a_seed_each_choice_samples_with_the_next_seed_as_vllm():
    _, frame, _ = parse_request(body(n=3, seed=2**63 - 2), LIMITS)
    assert [f.seed for f in choice_frames(frame, 3)] == [2**63 - 2, 2**63 - 1, 0]
    _, unseeded, _ = parse_request(body(n=2), LIMITS)
    assert [f.seed for f in choice_frames(unseeded, 2)] == [None, None]


def test_logprobs_in_the_chat_and_the_completions_shapes():
    lp = [TokenLogprob("é", -0.1, [TopLogprob("é", -0.1), TopLogprob("e", -2.5)]), TokenLogprob("t", -0.2, [])]
    tokens = [TokenEvent(request_id="x", seq=0, text="é", token_ids=[1], logprobs=lp[:1]),
              TokenEvent(request_id="x", seq=1, text="t", token_ids=[2], logprobs=lp[1:])]
    final = FinalEvent(request_id="x", seq=2, finish_reason="stop",
                       usage=Usage(prompt_tokens=5, cached_prompt_tokens=0, completion_tokens=2))
    info = info_of("x", final, UsageFrame(5, 0, 2, 1.0, 2.0))
    chat = msgspec.to_builtins(ChatShape().whole("chatcmpl-x", 1, "m", [Answer(tokens, final)], info))
    (first, second) = chat["choices"][0]["logprobs"]["content"]
    assert first == {"token": "é", "logprob": -0.1, "bytes": [195, 169],
                     "top_logprobs": [{"token": "é", "logprob": -0.1, "bytes": [195, 169]},
                                      {"token": "e", "logprob": -2.5, "bytes": [101]}]}
    assert second["top_logprobs"] == []
    text = msgspec.to_builtins(TextShape().whole("cmpl-x", 1, "m", [Answer(tokens, final)], info))
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "ét"
    assert text["choices"][0]["logprobs"] == {"tokens": ["é", "t"], "token_logprobs": [-0.1, -0.2],
                                              "top_logprobs": [{"é": -0.1, "e": -2.5}, {"t": -0.2}],
                                              "text_offset": [0, 1]}
    streamed = msgspec.to_builtins(TextShape().chunk("cmpl-x", 1, "m", tokens[1], 1))
    assert streamed["choices"][0]["logprobs"]["text_offset"] == [1]
    plain = [msgspec.structs.replace(t, logprobs=None) for t in tokens]
    assert msgspec.to_builtins(ChatShape().whole("c", 1, "m", [Answer(plain, final)], info))["choices"][0][
        "logprobs"] is None


def test_error_codes_map_to_http_statuses():
    assert error_body("too_many_requests", "m")[0] == 429
    assert error_body("frame_too_large", "m")[0] == 413
    assert error_body("unavailable", "m")[0] == 503
    assert error_body("unauthorized", "m")[1].error.type == "authentication_error"
    assert error_body("something_new", "m")[0] == 500


def test_ignored_field_names_are_remembered_bounded_in_number_and_length():
    from edge.openai_wire import IgnoredFields

    ignored = IgnoredFields(most=2)
    assert ignored.note("a") == ("a", True) and ignored.note("a") == ("a", False)
    assert ignored.note("b" * 1000) == ("b" * 64, True)  # a label of the client's making, cut
    assert ignored.note("c") == ("other", False)  # past the first two names: one label for the rest


def test_tool_call_arguments_count_toward_the_prompts_characters():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "x" * (LIMITS.max_prompt_chars + 1)}}
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(FrameError, match="characters"):
        parse_request(body(messages=history), LIMITS)
