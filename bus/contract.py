"""The bus contract as an AsyncAPI 3.0 document, generated from the code that defines it.

The channels and who sends, receives or pulls each (the operations, `<role>.<action>.<channel>`)
come from the table of `bus.topology`, which the NATS permissions are generated from too; the
addresses from `bus.subjects.Subjects` (called with placeholder tokens) and the payload schemas
from the msgspec Structs of `bus.messages`, so the document cannot say something the code does
not do. The checked-in copy (`bus/asyncapi.json`) is compared with a fresh one by the
test suite: change a message or a subject and the test tells you to regenerate it with
`grokstack asyncapi --write`.

Why not faststream's generator: it derives payload schemas through pydantic, which does not
know msgspec Structs; msgspec's own JSON Schema is exactly what our decoders accept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from bus import messages as m
from bus.priorities import PRIORITIES
from bus.subjects import Subjects
from bus.topology import CHANNELS, OPERATIONS, Action, Channel, Tokens, roles_that, work_kinds

CHECKED_IN = Path(__file__).with_name("asyncapi.json")

# Placeholder tokens that pass subject validation, swapped for AsyncAPI parameters afterwards;
# in this order, so a stream name (`PREFIXX_KINDX_REGIONX`) becomes one parameter, not three.
_PARAMS = {"PREFIXX_KINDX_REGIONX": "stream", "PREFIXX": "prefix", "REGIONX": "region", "PRIORITYX": "priority",
           "CLIENTX": "client", "TENANTX": "tenant", "REQUESTX": "request_id", "ROLEX": "role", "KINDX": "kind",
           "CONSUMERX": "consumer", "WORKERX": "worker"}
_PLACEHOLDERS = Tokens(region="REGIONX", priority="PRIORITYX", client="CLIENTX", tenant="TENANTX",
                       request_id="REQUESTX", role="ROLEX", kind="KINDX", consumer="CONSUMERX",
                       worker="WORKERX")
_PARAM_DOCS = {
    "prefix": {"description": "subject prefix of one deployment (GROKSTACK_SUBJECT_PREFIX)",
               "default": "gs"},
    "region": {"description": "a region (GROKSTACK_REGION): of the pool that serves the work, or of "
                              "the client that waits for the events (whose capture stores them)",
               "default": "local"},
    "priority": {"enum": list(PRIORITIES), "description": "served highest first"},
    "client": {"description": "id of the edge node or client that waits for the events"},
    "tenant": {"description": "the tenant whose request it is, 1-64 of A-Z a-z 0-9 _ - (the body's "
                              "`tenant`; a client login may publish only its own)", "default": "public"},
    "request_id": {"description": "the request's id, 1-64 of A-Z a-z 0-9 _ -"},
    "role": {"enum": [str(r) for r in roles_that("send", "heartbeats")],
             "description": "the worker's role (bus/roles.py)"},
    "kind": {"enum": list(work_kinds()), "description": "what the work stream holds"},
    "stream": {"description": "a region's work stream: the prefix in capitals, _REQ or _DECODE, "
                              "then _<region>",
               "examples": [Subjects().stream(kind, "local") for kind in work_kinds()]},
    "worker": {"description": "the worker's name (GROKSTACK_WORKER_ID, else host-pid), or the first 16 "
                              "hex digits of its SHA-256 when it is not a token"},
    "consumer": {"description": "the work consumer, <kind>-<region>-<priority>",
                 "examples": [Subjects().consumer("req", "local", "interactive")]},
}
# AsyncAPI knows two actions: a pull from a work queue is a way to receive.
_ACTIONS: dict[Action, str] = {"send": "send", "receive": "receive", "pull": "receive"}

_HEADERS = {"type": "object", "properties": {"Nats-Msg-Id": {
    "type": "string", "description": "set it to the request_id: a second publish of the same id "
    "within the dedupe window is stored once (idempotency)"}}}


def _address(subject: str) -> str:
    for token, name in _PARAMS.items():
        subject = subject.replace(token, "{" + name + "}")
    return subject


def _channel(channel: Channel) -> dict[str, Any]:
    address = _address(channel.address(Subjects("PREFIXX"), _PLACEHOLDERS))
    names = [p[1:-1] for p in address.split(".") if p.startswith("{")]
    return {"address": address, "description": channel.description,
            "parameters": {n: _PARAM_DOCS[n] for n in names},
            "messages": {t.__name__: {"$ref": f"#/components/messages/{t.__name__}"} for t in channel.messages}}


def document() -> dict[str, Any]:
    types = list(dict.fromkeys(t for c in CHANNELS for t in c.messages))
    # what goes into a work queue is deduplicated by its Nats-Msg-Id
    deduplicated = {t for c in CHANNELS if c.work is not None for t in c.messages}
    _, schemas = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "grokstack bus", "version": str(m.SCHEMA_VERSION),
                 "description": "Every subject and message of the grokstack bus, and which role sends and "
                                "receives each (operations are named <role>.<action>.<channel>; a pull takes "
                                "jobs from a JetStream work queue). Payloads are JSON objects tagged by "
                                "`type`, with schema version `v`."},
        "defaultContentType": "application/json",
        "servers": {"nats": {"host": "localhost:4222", "protocol": "nats",
                             "description": "NATS with JetStream (NATS_URL)"}},
        "channels": {c.name: _channel(c) for c in CHANNELS},
        "operations": {op.name: {"action": _ACTIONS[op.action], "channel": {"$ref": f"#/channels/{op.channel}"},
                                 "summary": op.summary}
                       for op in OPERATIONS},
        "components": {
            "messages": {t.__name__: {
                "name": t.__struct_config__.tag, "contentType": "application/json",
                "payload": {"$ref": f"#/components/schemas/{t.__name__}"},
                **({"headers": _HEADERS} if t in deduplicated else {})}
                for t in types},
            "schemas": schemas,
        },
    }


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def write(path: Path = CHECKED_IN) -> None:
    path.write_text(render())


def is_current(path: Path = CHECKED_IN) -> bool:
    return path.exists() and path.read_text() == render()
