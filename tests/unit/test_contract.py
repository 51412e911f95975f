"""The checked-in AsyncAPI document is the one the code generates: the contract cannot drift."""

from __future__ import annotations

import json

from bus import contract
from bus.messages import ChatRequest


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
    assert doc["channels"]["requests"]["address"] == "{prefix}.req.{region}.{priority}"
    assert doc["channels"]["events"]["address"] == "{prefix}.evt.{client}.{request_id}"
    for op in doc["operations"].values():
        assert op["channel"]["$ref"].rsplit("/", 1)[1] in doc["channels"]


def test_the_request_schema_is_what_the_decoder_enforces():
    schema = json.loads(contract.render())["components"]["schemas"]["ChatRequest"]
    assert schema["properties"]["type"]["enum"] == [ChatRequest.__struct_config__.tag]
    assert {"request_id", "region", "priority", "messages", "sampling", "reply_to"} <= set(schema["required"])
    assert schema["additionalProperties"] is False
