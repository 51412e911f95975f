"""The OpenAPI 3.1 document of the edge's HTTP API, written from the route table itself.

Each handler declares what it takes and answers (`operation`), next to its code; `document`
walks the routes the app serves and writes their paths, bodies and answers, with the schemas
msgspec derives from the same Structs the handlers decode and encode. A route without a
declaration fails the document (and its test), so the two cannot drift apart. Served at
/openapi.json; a copy is checked in (edge/openapi.json) and held current by a test, like the bus's
AsyncAPI document.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import msgspec
from aiohttp import web

from edge.openai_responses import ErrorBody, package_version

PATH = Path(__file__).with_name("openapi.json")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Operation:
    summary: str
    body: type | None = None  # the JSON body it takes
    returns: type | None = None  # its JSON answer
    streams: type | None = None  # with `"stream": true`: server-sent events of this
    text: bool = False  # a plain-text answer (probes)
    auth: bool = True  # needs an API key (when the edge has keys)


def operation(summary: str, **fields: Any) -> Callable[[F], F]:
    def mark(handler: F) -> F:
        handler.__openapi__ = Operation(summary, **fields)  # type: ignore[attr-defined]
        return handler
    return mark


def declared(handler: Callable[..., Any]) -> Operation:
    op = getattr(handler, "__openapi__", None)
    if op is None:
        raise LookupError(f"handler {getattr(handler, '__qualname__', handler)!r} declares no operation "
                          "(edge/openapi.py: @operation)")
    return op


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def _json_content(kind: type) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(kind)}}


def document(routes: Iterable[web.RouteDef]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    types: list[type] = [ErrorBody]
    operation_ids: set[str] = set()
    for route in routes:
        op = declared(route.handler)
        types += [t for t in (op.body, op.returns, op.streams) if t is not None]
        ok: dict[str, Any] = {"description": "OK"}
        content: dict[str, Any] = {}
        if op.returns is not None:
            content |= _json_content(op.returns)
        if op.streams is not None:
            content["text/event-stream"] = {
                "schema": {"type": "string"},
                "x-event-data": _ref(op.streams),
                "description": "`data: <json>` then `id: <seq>` per event; `data: [DONE]` last"}
        if op.text:
            content["text/plain"] = {"schema": {"type": "string"}}
        if content:
            ok["content"] = content
        # unique, as OpenAPI wants: a handler serving two routes is named by its path too
        operation_id = route.handler.__name__
        if operation_id in operation_ids:
            operation_id += "_" + re.sub(r"[^A-Za-z0-9]+", "_", route.path).strip("_")
        operation_ids.add(operation_id)
        entry: dict[str, Any] = {
            "summary": op.summary, "operationId": operation_id,
            "responses": {"200": ok, "default": {"description": "An error, as OpenAI's",
                                                 "content": _json_content(ErrorBody)}}}
        params = re.findall(r"{(\w+)}", route.path)
        if params:
            entry["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                   for p in params]
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": _json_content(op.body)}
        if op.auth:
            entry["security"] = [{"bearer": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = entry
    _, schemas = msgspec.json.schema_components(list(dict.fromkeys(types)),
                                                ref_template="#/components/schemas/{name}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "grokstack edge: OpenAI-compatible API", "version": package_version()},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def render(routes: Iterable[web.RouteDef]) -> str:
    doc = document(routes)
    doc["info"]["version"] = "checked-in"  # the copy does not change with each release
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
