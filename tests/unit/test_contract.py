"""The checked-in AsyncAPI document is the one the code generates, and it says what the NATS
permissions enforce: the contract cannot drift."""

from __future__ import annotations

import json

import pytest

from bus import contract
from bus.capture import subject_matches
from bus.messages import ChatRequest
from bus.permissions import permissions
from bus.roles import ROLES, Role
from bus.subjects import Subjects
from bus.topology import channel_named


def may(patterns: tuple[str, ...], subject: str) -> bool:
    return any(subject_matches(p, subject) for p in patterns)


def test_the_checked_in_asyncapi_document_is_current():
    assert contract.is_current(), "bus/asyncapi.json is stale: run `grokstack asyncapi --write`"


def test_every_channel_names_real_messages_and_parameters():
    doc = json.loads(contract.render())
    assert doc["asyncapi"] == "3.0.0"
    messages, schemas = doc["components"]["messages"], doc["components"]["schemas"]
    for name, channel in doc["channels"].items():
        params = [p[1:-1] for p in channel["address"].split(".") if p.startswith("{")]
        assert sorted(params) == sorted(channel["parameters"]), name
        for ref in channel["messages"].values():
            target = ref["$ref"].rsplit("/", 1)[1]
            assert target in messages and target in schemas
    assert doc["channels"]["requests"]["address"] == "{prefix}.req.{region}.{priority}.{tenant}.{request_id}"
    assert doc["channels"]["events"]["address"] == "{prefix}.evt.{region}.{client}.{request_id}"
    assert doc["channels"]["heartbeats"]["parameters"]["role"]["enum"] == ["prefill", "decode", "aggregated"]
    for op in doc["operations"].values():
        assert op["channel"]["$ref"].rsplit("/", 1)[1] in doc["channels"]


def test_the_request_schema_is_what_the_decoder_enforces():
    schema = json.loads(contract.render())["components"]["schemas"]["ChatRequest"]
    assert schema["properties"]["type"]["enum"] == [ChatRequest.__struct_config__.tag]
    assert {"request_id", "region", "priority", "messages", "sampling", "reply_to"} <= set(schema["required"])
    assert schema["additionalProperties"] is False


def _sample(address: str, prefix: str, role: Role) -> str:
    """A subject of the channel as `role` would use it: its own role token and kind of work."""
    kind = ROLES[role].pulls or "req"
    subjects = Subjects(prefix)
    values = {"prefix": prefix, "region": "eu", "priority": "batch", "client": "e1", "tenant": "acme",
              "request_id": "r1", "role": str(role), "kind": kind, "stream": subjects.stream(kind, "eu"),
              "consumer": subjects.consumer(kind, "eu", "batch"), "worker": "w1"}
    return ".".join(values[t[1:-1]] if t.startswith("{") else t for t in address.split("."))


@pytest.mark.parametrize("subjects, prefix", [(Subjects("gs"), "gs"), (Subjects.any_prefix(), "t0123")])
@pytest.mark.parametrize("edge_id", [None, "e1"])
def test_the_document_and_the_permissions_say_the_same_thing(subjects: Subjects, prefix: str, edge_id):
    """Whoever the document says sends to a channel may publish to it, whoever receives it may
    subscribe to it, whoever pulls it may pull its work queue; and nobody may do more."""
    doc = json.loads(contract.render())
    does: dict[tuple[str, str], set[str]] = {}
    for name in doc["operations"]:
        role, action, channel = name.split(".")
        does.setdefault((role, channel), set()).add(action)
    for role in ROLES:
        if role == Role.CLIENT:  # a client login is always bound to its tenant and client id
            allowed = permissions(role, subjects, "e1", regions=("eu",), tenant="acme")
        else:
            allowed = permissions(role, subjects, edge_id, regions=("eu",))
        if allowed.publish == (">",):
            assert role == Role.OPS  # ops may do everything, whatever it is documented to do
            continue
        for name, channel in doc["channels"].items():
            subject, actions = _sample(channel["address"], prefix, role), does.get((role, name), set())
            assert may(allowed.publish, subject) == ("send" in actions), (role, subject)
            assert may(allowed.subscribe, subject) == ("receive" in actions), (role, subject)
            work = channel_named(name).work
            if work is not None:
                stream = Subjects(prefix).stream(work, "eu")
                pulls = [f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{Subjects(prefix).consumer(work, 'eu', 'batch')}",
                         f"$JS.ACK.{stream}.c.1.2.3.4.5", f"$JS.API.STREAM.MSG.DELETE.{stream}"]
                may_pull = all(may(allowed.publish, p) for p in pulls)
                if subjects.is_any_prefix:
                    # a server of every prefix grants the JetStream API of every stream (bus/permissions.py),
                    # so there a role reaches work queues it does not pull: only one side holds
                    assert may_pull or "pull" not in actions, (role, name)
                else:
                    assert may_pull == ("pull" in actions), (role, name)
