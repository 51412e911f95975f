"""Wire encoding: pure functions from messages to bytes and back, no sockets.

JSON (msgspec) on every subject, so any NATS client in any language can publish a job or read
token events with nothing but a JSON library.
"""

from __future__ import annotations

import base64
from typing import Any, TypeVar

import msgspec

from bus.messages import Event, ReplyRoute

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
