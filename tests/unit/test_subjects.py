import pytest

from bus.priorities import PRIORITIES
from bus.subjects import Subjects, check_token

S = Subjects("gs")


def test_work_subjects_are_partitioned_by_region_and_priority():
    assert S.request("eu-west", "interactive") == "gs.req.eu-west.interactive"
    assert S.decode("us", "batch") == "gs.decode.us.batch"
    assert S.consumer("req", "us", "standard") == "req-us-standard"
    assert PRIORITIES == ("interactive", "standard", "batch")


def test_each_region_has_its_own_streams_of_its_own_subjects():
    assert S.stream("req", "eu") == "GS_REQ_eu" and S.stream_subjects("req", "eu") == "gs.req.eu.>"
    assert S.capture_copies_in("decode", "eu") == "gs.cap.decode.eu.>"
    assert S.captured("eu") == ["gs.cap.*.eu.*", "gs.evt.eu.>", "gs.cancel.eu"]
    assert S.stream("capture", "us") == "GS_CAPTURE_us"
    assert S.doorbell("req", "us") == "gs.bell.req.us.*"
    assert S.doorbells_from_copies("us") == "gs.bell.{{wildcard(1)}}.us.{{wildcard(2)}}"
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
    assert S.original_subject("gs.cap.req.eu.batch") == "gs.req.eu.batch"
    assert S.original_subject("gs.evt.eu.e.r") == "gs.evt.eu.e.r"
    assert S.moved_to("gs.req.eu.batch", Subjects("sandbox")) == "sandbox.req.eu.batch"
    assert S.events_of_request("r1") == "gs.evt.*.*.r1"
    with pytest.raises(ValueError):
        S.moved_to("gsx.req.eu.batch", Subjects("sandbox"))


@pytest.mark.parametrize("bad", ["", "a.b", "a*", ">", "has space", "x" * 65])
def test_tokens_that_would_change_a_subjects_meaning_are_refused(bad):
    with pytest.raises(ValueError):
        check_token(bad, "region")
    with pytest.raises(ValueError):
        S.request(bad, "batch")
