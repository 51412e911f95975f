"""Every NATS subject and JetStream name of the stack, built in one place.

Layout (prefix `gs` by default):
  gs.req.<region>.<priority>        chat requests        (stream GS_REQ, work queue)
  gs.decode.<region>.<priority>     decode jobs          (stream GS_DECODE, work queue)
  gs.bell.<kind>.<region>.<priority> header-only copies the streams republish: wake-up calls
  gs.evt.<edge>.<request_id>        token/final/error events back to the edge that asked
  gs.cancel.<region>                cancellations, to every worker of a region
  gs.hb.<region>.<role>             worker heartbeats
  gs.dlq.<kind>                     dead letters          (stream GS_DLQ, kept for inspection)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Priority = Literal["interactive", "standard", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "standard", "batch")  # highest first
WorkKind = Literal["req", "decode"]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_token(value: str, what: str) -> str:
    """A subject token must not contain separators or wildcards: reject it rather than build a
    subject that means something else."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


@dataclass(frozen=True)
class Subjects:
    prefix: str = "gs"

    def __post_init__(self) -> None:
        check_token(self.prefix, "subject prefix")

    # --- work queues ---
    def work(self, kind: WorkKind, region: str, priority: Priority) -> str:
        return f"{self.prefix}.{kind}.{check_token(region, 'region')}.{priority}"

    def request(self, region: str, priority: Priority) -> str:
        return self.work("req", region, priority)

    def decode(self, region: str, priority: Priority) -> str:
        return self.work("decode", region, priority)

    def doorbell(self, kind: WorkKind, region: str) -> str:
        return f"{self.prefix}.bell.{kind}.{check_token(region, 'region')}.*"

    def stream(self, kind: Literal["req", "decode", "dlq"]) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_{kind.upper()}"

    def stream_subjects(self, kind: WorkKind) -> str:
        return f"{self.prefix}.{kind}.>"

    def doorbell_template(self, kind: WorkKind) -> str:
        return f"{self.prefix}.bell.{kind}.>"

    def consumer(self, kind: WorkKind, region: str, priority: Priority) -> str:
        return f"{kind}-{check_token(region, 'region')}-{priority}"

    # --- events back to the edge ---
    def events(self, edge_id: str, request_id: str) -> str:
        return f"{self.prefix}.evt.{check_token(edge_id, 'edge id')}.{check_token(request_id, 'request id')}"

    def events_of_edge(self, edge_id: str) -> str:
        return f"{self.prefix}.evt.{check_token(edge_id, 'edge id')}.*"

    def is_event_subject(self, subject: str) -> bool:
        parts = subject.split(".")
        return len(parts) == 4 and parts[0] == self.prefix and parts[1] == "evt" and all(
            _TOKEN.match(p) for p in parts[2:])

    # --- control ---
    def cancel(self, region: str) -> str:
        return f"{self.prefix}.cancel.{check_token(region, 'region')}"

    def heartbeat(self, region: str, role: str) -> str:
        return f"{self.prefix}.hb.{check_token(region, 'region')}.{check_token(role, 'role')}"

    def heartbeats(self, region: str) -> str:
        return f"{self.prefix}.hb.{check_token(region, 'region')}.*"

    def dead_letter(self, kind: str) -> str:
        return f"{self.prefix}.dlq.{check_token(kind, 'dead-letter kind')}"

    def dead_letters(self) -> str:
        return f"{self.prefix}.dlq.>"
