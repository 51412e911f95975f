import pytest

from bus.capture import subject_matches
from bus.codec import BadMessage, check_request_subject
from bus.messages import ChatMessage, ChatRequest, SamplingSpec
from bus.priorities import PRIORITIES
from bus.subjects import Subjects, check_token

S = Subjects("gs")


def test_work_subjects_are_partitioned_by_region_and_priority_and_requests_name_tenant_and_id():
    assert S.request("eu-west", "interactive", "acme", "r1") == "gs.req.eu-west.interactive.acme.r1"
    assert S.decode("us", "batch") == "gs.decode.us.batch"
    assert S.consumer("req", "us", "standard") == "req-us-standard"
    assert PRIORITIES == ("interactive", "standard", "batch")
    # a work consumer takes every request of its priority, whatever its tenant and id
    assert S.work("req", "eu", "batch") == "gs.req.eu.batch.>"
    assert S.work("decode", "eu", "batch") == "gs.decode.eu.batch"
    assert subject_matches(S.work("req", "eu", "batch"), S.request("eu", "batch", "acme", "r1"))
    assert not subject_matches(S.work("req", "eu", "batch"), S.request("eu", "standard", "acme", "r1"))
    assert S.requests_of_tenant("acme") == "gs.req.*.*.acme.*"
    assert S.request_tokens("gs.req.eu.batch.acme.r1") == ("eu", "batch", "acme", "r1")
    assert S.request_tokens("gs.cap.req.eu.batch.acme.r1") == ("eu", "batch", "acme", "r1")
    assert S.request_tokens("gs.req.eu.batch") is None and S.request_tokens("gs.decode.eu.batch.a.b") is None


def test_each_region_has_its_own_streams_of_its_own_subjects():
    assert S.stream("req", "eu") == "GS_REQ_eu" and S.stream_subjects("req", "eu") == "gs.req.eu.*.*.*"
    assert S.stream_subjects("decode", "eu") == "gs.decode.eu.*"
    assert not subject_matches(S.stream_subjects("req", "eu"), "gs.req.eu.batch")  # the layout before tenants
    assert S.capture_copies_from("req", "eu") == "gs.cap.req.eu.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}"
    assert S.capture_copies_from("decode", "eu") == "gs.cap.decode.eu.{{wildcard(1)}}"
    assert S.capture_copies_in("decode", "eu") == "gs.cap.decode.eu.>"
    assert S.captured("eu") == ["gs.cap.*.eu.>", "gs.evt.eu.>", "gs.cancel.eu"]
    assert S.captured_request("eu", "batch", "acme", "r1") == "gs.cap.req.eu.batch.acme.r1"
    assert S.captured_copies_of_request("eu", "acme", "r1") == "gs.cap.req.eu.*.acme.r1"
    copy = S.captured_request("eu", "batch", "acme", "r1")
    assert subject_matches(S.captured_copies_of_request("eu", "acme", "r1"), copy)
    assert subject_matches(S.capture_copies_in("req", "eu"), S.captured_request("eu", "batch", "acme", "r1"))
    assert S.stream("capture", "us") == "GS_CAPTURE_us"
    assert S.doorbell("req", "us") == "gs.bell.req.us.>"
    assert S.doorbells_from_copies("us") == "gs.bell.{{wildcard(1)}}.us.>"
    assert Subjects("t-1").stream("dlq", "eu") == "T_1_DLQ_eu"
    assert S.stream("req", "*") == "*" and Subjects.any_prefix().stream("req", "eu") == "*"


def test_event_and_control_subjects():
    assert S.events("eu", "edge1", "abc") == "gs.evt.eu.edge1.abc"
    assert S.events_of_edge("eu", "edge1") == "gs.evt.eu.edge1.*"
    assert S.events_of_client("edge1") == "gs.evt.*.edge1.*"
    assert S.region_events("eu") == "gs.evt.eu.>"
    assert S.event_region("gs.evt.eu.edge1.abc") == "eu"
    assert S.cancel("eu") == "gs.cancel.eu"
    assert S.heartbeat("eu", "decode") == "gs.hb.eu.decode"
    assert S.dead_letter("eu", "req") == "gs.dlq.eu.req" and S.dead_letters("eu") == "gs.dlq.eu.*"


def test_event_subject_check_rejects_anything_else():
    assert S.is_event_subject("gs.evt.eu.e1.r1", "r1")
    for other in ("gs.req.local.batch", "gs.evt.e1.r1", "gs.evt.eu.e1.r1.x", "other.evt.eu.e1.r1",
                  "gs.evt.eu.*.r1", "gs.evt.*.e1.r1", "gs.evt.eu.e1.r2"):
        assert not S.is_event_subject(other, "r1")


def test_captured_copies_map_back_and_move_to_a_sandbox():
    assert S.original_subject("gs.cap.req.eu.batch.acme.r1") == "gs.req.eu.batch.acme.r1"
    assert S.original_subject("gs.cap.decode.eu.batch") == "gs.decode.eu.batch"
    assert S.original_subject("gs.evt.eu.e.r") == "gs.evt.eu.e.r"
    assert S.moved_to("gs.req.eu.batch.acme.r1", Subjects("sandbox")) == "sandbox.req.eu.batch.acme.r1"
    assert S.events_of_request("r1") == "gs.evt.*.*.r1"
    with pytest.raises(ValueError):
        S.moved_to("gsx.req.eu.batch", Subjects("sandbox"))


@pytest.mark.parametrize("bad", ["", "a.b", "a*", ">", "has space", "x" * 65])
def test_tokens_that_would_change_a_subjects_meaning_are_refused(bad):
    with pytest.raises(ValueError):
        check_token(bad, "region")
    for tokens in ((bad, "batch", "t", "r"), ("eu", "batch", bad, "r"), ("eu", "batch", "t", bad)):
        with pytest.raises(ValueError):
            S.request(*tokens)


def request(**changes) -> ChatRequest:
    fields = dict(request_id="r1", region="eu", priority="batch", tenant="acme", reply_to="gs.evt.eu.c.r1",
                  messages=[ChatMessage(role="user", content="hi")], sampling=SamplingSpec(max_tokens=4))
    return ChatRequest(**(fields | changes))


def test_a_pulled_request_must_be_what_its_subject_says():
    subject = S.request("eu", "batch", "acme", "r1")
    check_request_subject(S, subject, request())
    for changed, named in ((dict(tenant="other"), "tenant"), (dict(tenant=None), "tenant"),
                           (dict(request_id="r2"), "request_id"), (dict(priority="interactive"), "priority"),
                           (dict(region="us"), "region")):
        with pytest.raises(BadMessage, match=named):
            check_request_subject(S, subject, request(**changed))
    with pytest.raises(BadMessage, match="not a request subject"):
        check_request_subject(S, "gs.req.eu.batch", request())
