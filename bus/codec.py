"""Wire encoding: pure functions from messages to bytes and back, no sockets.

JSON (msgspec) on every subject, so any NATS client in any language can publish a job or read
token events with nothing but a JSON library.
"""

from __future__ import annotations

import base64
from typing import Any, TypeVar

import msgspec

from bus.messages import ChatRequest, Event, ReplyRoute
from bus.subjects import Subjects

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder] = {}


class BadMessage(ValueError):
    """A message that cannot be decoded or fails validation; `reason` names the problem."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, kind: type[T]) -> T:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass: both name the problem
        raise BadMessage(str(exc)) from None
    except UnicodeDecodeError as exc:  # msgspec raises it for bad bytes inside a JSON string
        raise BadMessage(f"the message is not valid UTF-8: {exc}") from None


def decode_event(data: bytes) -> Event:
    return decode(data, Event)  # type: ignore[arg-type]


def check_request_subject(subjects: Subjects, subject: str, request: ChatRequest) -> None:
    """A pulled request is what its subject says: the subject's tenant and request id are the body's
    (NATS binds a client login to its tenant's subjects, not to what its payload claims), and its
    region and priority too. BadMessage otherwise: a malformed message, dead-lettered once."""
    tokens = subjects.request_tokens(subject)
    if tokens is None:
        raise BadMessage(f"{subject!r} is not a request subject")
    named = dict(zip(("region", "priority", "tenant", "request_id"), tokens, strict=True))
    for field, value in named.items():
        if getattr(request, field) != value:
            raise BadMessage(f"the request's {field} {getattr(request, field)!r} is not its subject's {value!r}")


def reply_route(data: bytes) -> ReplyRoute:
    """Best effort: where to send the error for a message that failed full validation."""
    try:
        return msgspec.json.decode(data, type=ReplyRoute)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return ReplyRoute()


def printable_payload(data: bytes) -> tuple[str, str]:
    """(payload, encoding) for a dead-letter record: the text when it is UTF-8, else base64."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"
