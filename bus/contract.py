"""The bus contract as an AsyncAPI 3.0 document, generated from the code that defines it.

Addresses come from `bus.subjects.Subjects` (called with placeholder tokens) and payload
schemas from the msgspec Structs of `bus.messages`, so the document cannot say something the
code does not do. The checked-in copy (`bus/asyncapi.json`) is compared with a fresh one by the
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
from bus.roles import WORKER_ROLES
from bus.subjects import Subjects

CHECKED_IN = Path(__file__).with_name("asyncapi.json")

# Placeholder tokens that pass subject validation, swapped for AsyncAPI parameters afterwards.
_PARAMS = {"PREFIXX": "prefix", "REGIONX": "region", "PRIORITYX": "priority", "CLIENTX": "client",
           "REQUESTX": "request_id", "ROLEX": "role", "KINDX": "kind"}
_PARAM_DOCS = {
    "prefix": {"description": "subject prefix of one deployment (GROKSTACK_SUBJECT_PREFIX)",
               "default": "gs"},
    "region": {"description": "region of the worker pool that serves the work (GROKSTACK_REGION)",
               "default": "local"},
    "priority": {"enum": list(PRIORITIES), "description": "served highest first"},
    "client": {"description": "id of the edge node or client that waits for the events"},
    "request_id": {"description": "the request's id, 1-64 of A-Z a-z 0-9 _ -"},
    "role": {"enum": [str(r) for r in WORKER_ROLES], "description": "the worker's role (bus/roles.py)"},
    "kind": {"enum": ["req", "decode"], "description": "what the work stream holds"},
}

_HEADERS = {"type": "object", "properties": {"Nats-Msg-Id": {
    "type": "string", "description": "set it to the request_id: a second publish of the same id "
    "within the dedupe window is stored once (idempotency)"}}}


def _address(subject: str) -> str:
    for token, name in _PARAMS.items():
        subject = subject.replace(token, "{" + name + "}")
    return subject


def _channels(s: Subjects) -> dict[str, dict[str, Any]]:
    named = Subjects()  # stream names as they are with the default prefix
    def channel(address: str, refs: list[type], description: str, headers: bool = False) -> dict:
        address = _address(address)
        names = [p[1:-1] for p in address.split(".") if p.startswith("{")]
        return {"address": address, "description": description,
                "parameters": {n: _PARAM_DOCS[n] for n in names},
                "messages": {t.__name__: {"$ref": f"#/components/messages/{t.__name__}"} for t in refs}}

    return {
        "requests": channel(s.request("REGIONX", "PRIORITYX"), [m.ChatRequest],  # type: ignore[arg-type]
                            "Chat requests for the prefill pool, in the JetStream work queue "
                            f"{named.stream('req')}: an accepted request survives a worker's death."),
        "decodeJobs": channel(s.decode("REGIONX", "PRIORITYX"), [m.DecodeJob],  # type: ignore[arg-type]
                              f"Prefill -> decode hand-over with the KV handle (work queue {named.stream('decode')})."),
        "events": channel(s.events("CLIENTX", "REQUESTX"), [m.TokenEvent, m.FinalEvent, m.ErrorEvent],
                          "Token events of one request, numbered by seq from 0; then one final or "
                          "error event. The request's reply_to must be exactly this subject."),
        "cancels": channel(s.cancel("REGIONX"), [m.Cancel], "Stop a request wherever it is."),
        "heartbeats": channel(s.heartbeat("REGIONX", "ROLEX"), [m.Heartbeat],
                              "Each worker, every GROKSTACK_HEARTBEAT_S seconds."),
        "deadLetters": channel(s.dead_letter("KINDX"), [m.DeadLetter],
                               f"What could not be served and why (stream {named.stream('dlq')})."),
        "captureCopies": channel(_capture_copy(s), [m.ChatRequest, m.DecodeJob],
                                 f"Full copies of the work messages, kept with the events and cancels "
                                 f"in {named.stream('capture')} for replay and tracing. Read only."),
    }


def _capture_copy(s: Subjects) -> str:
    return s.capture_copies("KINDX")[:-1] + "REGIONX.PRIORITYX"  # type: ignore[arg-type]


_OPERATIONS = [
    ("submitRequest", "send", "requests", "A client (edge, JobClient or any NATS client) submits a job."),
    ("receiveEvents", "receive", "events", "The client reads its job's tokens and outcome."),
    ("cancelRequest", "send", "cancels", "A client gives up on a job."),
    ("serveRequests", "receive", "requests", "Prefill workers take requests by priority."),
    ("handOverDecodeJob", "send", "decodeJobs", "Prefill publishes the decode job."),
    ("serveDecodeJobs", "receive", "decodeJobs", "Decode workers take decode jobs by priority."),
    ("streamEvents", "send", "events", "Workers publish token, final and error events."),
    ("beat", "send", "heartbeats", "Workers announce they are alive."),
    ("recordDeadLetter", "send", "deadLetters", "Workers record a message they cannot serve."),
]


def document() -> dict[str, Any]:
    s = Subjects("PREFIXX")
    types = [m.ChatRequest, m.DecodeJob, m.TokenEvent, m.FinalEvent, m.ErrorEvent, m.Cancel,
             m.Heartbeat, m.DeadLetter]
    _, schemas = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "grokstack bus", "version": str(m.SCHEMA_VERSION),
                 "description": "Every subject and message of the grokstack bus. Payloads are "
                                "JSON objects tagged by `type`, with schema version `v`."},
        "defaultContentType": "application/json",
        "servers": {"nats": {"host": "localhost:4222", "protocol": "nats",
                             "description": "NATS with JetStream (NATS_URL)"}},
        "channels": _channels(s),
        "operations": {name: {"action": action, "channel": {"$ref": f"#/channels/{channel}"},
                              "summary": summary}
                       for name, action, channel, summary in _OPERATIONS},
        "components": {
            "messages": {t.__name__: {
                "name": t.__struct_config__.tag, "contentType": "application/json",
                "payload": {"$ref": f"#/components/schemas/{t.__name__}"},
                **({"headers": _HEADERS} if t in (m.ChatRequest, m.DecodeJob) else {})}
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
