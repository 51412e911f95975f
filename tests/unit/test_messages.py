import msgspec
import pytest

from bus.codec import BadMessage, decode, decode_event, encode, printable_payload, reply_route
from bus.messages import (Cancel, ChatMessage, ChatRequest, DecodeJob, ErrorEvent, FinalEvent,
                          KvHandle, PrefillStats, SamplingSpec, TokenEvent, Usage)

REQUEST = ChatRequest(request_id="r1", region="eu", priority="batch",
                      messages=[ChatMessage("system", "be nice"), ChatMessage("user", "hi")],
                      sampling=SamplingSpec(max_tokens=5, temperature=0.2, stop=["\n"]),
                      reply_to="gs.evt.e1.r1", conversation_id="c1", created_at=1.5)


@pytest.mark.parametrize("message", [
    REQUEST,
    DecodeJob(request_id="r1", region="eu", priority="batch", reply_to="gs.evt.e1.r1",
              prompt_token_ids=[1, 2, 3], first_token_id=4, sampling=SamplingSpec(max_tokens=9),
              prefill=PrefillStats("w", 1.0, 2.0, 0, 3.0),
              kv=KvHandle("m", "lay", 32, ["k1"], 32, "h")),
    DecodeJob(request_id="r1", region="eu", priority="batch", reply_to="gs.evt.e1.r1",  # handed on unprefilled
              prompt_token_ids=[1, 2, 3], first_token_id=None, sampling=SamplingSpec(max_tokens=9),
              prefill=PrefillStats("w", 1.0, 0.0, 0, 3.0), first_seq=0),
    TokenEvent(request_id="r1", seq=3, text="hé", token_ids=[7]),
    FinalEvent(request_id="r1", seq=4, finish_reason="stop", usage=Usage(10, 0, 5)),
    ErrorEvent(request_id="r1", seq=0, code="internal", message="boom"),
    Cancel(request_id="r1", reason="client_gone"),
])
def test_every_message_round_trips(message):
    assert decode(encode(message), type(message)) == message


def test_events_decode_by_their_type_tag():
    for event in (TokenEvent(request_id="r", seq=0, text="a", token_ids=[1]),
                  ErrorEvent(request_id="r", seq=1, code="x", message="y")):
        assert decode_event(encode(event)) == event


def test_wire_format_is_plain_json_with_a_type_tag_and_version():
    wire = msgspec.json.decode(encode(REQUEST))
    # the version at its default (1) stays off the wire of a request; a reader takes its absence as 1
    assert wire["type"] == "chat_request" and wire.get("v", 1) == 1 and decode(encode(REQUEST), ChatRequest).v == 1
    assert msgspec.json.decode(encode(Cancel(request_id="r1", reason="x")))["v"] == 1
    assert wire["messages"][1] == {"role": "user", "content": "hi"}


@pytest.mark.parametrize("mutate, words", [
    (lambda w: w.pop("messages"), "missing required field `messages`"),
    (lambda w: w.update(v=2), "unsupported schema version 2"),
    (lambda w: w.update(priority="urgent"), "$.priority"),
    (lambda w: w["sampling"].update(max_tokens=0), "$.sampling.max_tokens"),
    (lambda w: w["sampling"].update(temperature=9), "$.sampling.temperature"),
    (lambda w: w.update(request_id="has.dots"), "$.request_id"),
    (lambda w: w.update(type="decode_job"), "$.type"),
    (lambda w: w.update(surprise=1), "surprise"),
    # every number and length a direct publisher controls is bounded: refused once, not retried
    (lambda w: w["sampling"].update(seed=2**64), "$.sampling.seed"),
    (lambda w: w["sampling"].update(seed=-1), "$.sampling.seed"),
    (lambda w: w["sampling"].update(max_tokens=2**40), "$.sampling.max_tokens"),
    (lambda w: w.update(messages=[{"role": "user", "content": "x"}] * 5000), "$.messages"),
    (lambda w: w.update(reply_to="x" * 300), "$.reply_to"),
    (lambda w: w.update(attempt=10**6), "$.attempt"),
    (lambda w: w.update(deadline=-1.0), "$.deadline"),
    (lambda w: w.update(created_at=1e300), "$.created_at"),
    (lambda w: w.update(tenant="acme.eu"), "$.tenant"),
    (lambda w: w.update(continuation={"token_ids": [2**40], "next_seq": 1}), "$.continuation.token_ids"),
])
def test_invalid_messages_name_the_problem(mutate, words):
    wire = msgspec.json.decode(encode(REQUEST))
    mutate(wire)
    with pytest.raises(BadMessage) as info:
        decode(msgspec.json.encode(wire), ChatRequest)
    assert words in info.value.reason


def test_reply_route_is_read_even_from_an_invalid_message():
    route = reply_route(b'{"request_id": "r9", "reply_to": "gs.evt.e.r9", "junk": [}')
    assert route.request_id is None  # not JSON at all: nothing to route by
    route = reply_route(b'{"request_id": "r9", "reply_to": "gs.evt.e.r9", "messages": 5}')
    assert (route.request_id, route.reply_to) == ("r9", "gs.evt.e.r9")


def test_dead_letter_payload_is_text_when_it_can_be():
    assert printable_payload(b'{"a": 1}') == ('{"a": 1}', "utf-8")
    assert printable_payload(b"\xff\x00") == ("/wA=", "base64")


def test_the_largest_seed_vllm_takes_is_accepted_and_a_cancel_reason_is_bounded():
    top = msgspec.structs.replace(REQUEST, sampling=SamplingSpec(max_tokens=5, seed=2**63 - 1))
    assert decode(encode(top), ChatRequest).sampling.seed == 2**63 - 1
    with pytest.raises(BadMessage, match="reason"):
        decode(encode(Cancel(request_id="r1", reason="x" * 300)), Cancel)


def test_a_request_names_its_tenant_and_one_without_a_tenant_still_decodes():
    tagged = msgspec.structs.replace(REQUEST, tenant="acme-eu")
    assert decode(encode(tagged), ChatRequest).tenant == "acme-eu"
    older = msgspec.json.decode(encode(REQUEST))
    older.pop("tenant", None)  # published before requests carried one, or straight to the bus
    assert decode(msgspec.json.encode(older), ChatRequest).tenant is None
    with pytest.raises(BadMessage):
        decode(encode(msgspec.structs.replace(REQUEST, tenant="no spaces")), ChatRequest)


def test_a_default_request_and_token_event_encode_without_the_fields_added_since():
    """A worker or edge of the previous build (forbid_unknown_fields) reads them during a rolling
    update: fields at their defaults stay off the wire."""
    import msgspec

    from bus.messages import ChatMessage, ChatRequest, SamplingSpec, TokenEvent, TokenLogprob

    request = ChatRequest(request_id="r1", region="eu", priority="standard", messages=[ChatMessage("user", "hi")],
                          sampling=SamplingSpec(max_tokens=8), reply_to="gs.ev.eu.c.r1")
    fields = msgspec.json.decode(msgspec.json.encode(request))
    assert "prompt_format" not in fields and "top_k" not in fields["sampling"]
    assert fields["messages"] == [{"role": "user", "content": "hi"}]
    event = msgspec.json.decode(msgspec.json.encode(TokenEvent(request_id="r1", seq=0, text="a", token_ids=[1])))
    assert "logprobs" not in event
    # and what carries them still round-trips
    with_lp = TokenEvent(request_id="r1", seq=0, text="a", token_ids=[1], logprobs=[TokenLogprob("a", -0.5)])
    assert msgspec.json.decode(msgspec.json.encode(with_lp), type=TokenEvent) == with_lp
    text = msgspec.structs.replace(request, prompt_format="text")
    assert msgspec.json.decode(msgspec.json.encode(text), type=ChatRequest).prompt_format == "text"
