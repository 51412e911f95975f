"""Every NATS subject and JetStream name of the stack, built in one place.

Layout (prefix `gs` by default):
  gs.req.<region>.<priority>        chat requests        (stream GS_REQ, work queue)
  gs.decode.<region>.<priority>     decode jobs          (stream GS_DECODE, work queue)
  gs.cap.<kind>.<region>.<priority> full copies the work streams republish (stream GS_CAPTURE)
  gs.bell.<kind>.<region>.<priority> header-only copies GS_CAPTURE republishes: wake-up calls
  gs.evt.<client>.<request_id>      token/final/error events back to the edge or client that
                                    asked (captured by GS_CAPTURE)
  gs.cancel.<region>                cancellations, to every worker of a region (captured)
  gs.hb.<region>.<role>             worker heartbeats (not captured)
  gs.dlq.<kind>                     dead letters          (stream GS_DLQ, kept for inspection)

Work streams are work queues (a message is deleted once acked), so they cannot be the record of
what happened; GS_CAPTURE keeps copies of everything for replay and tracing, bounded by age and
size. A subject may belong to one stream only, hence the copies under `cap`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from bus.priorities import Priority

WorkKind = Literal["req", "decode"]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A whole-token wildcard. Only `Subjects.any_prefix()` uses it, to build permission patterns
# (bus/permissions.py) that match the subjects of every prefix; never a subject to publish to.
ANY = "*"


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

    @classmethod
    def any_prefix(cls) -> "Subjects":
        """Patterns for every prefix at once (`*.req.>` ...): for a server that serves many
        prefixes (tests, sandbox replays). Skips the check a real prefix gets."""
        patterns = object.__new__(cls)
        object.__setattr__(patterns, "prefix", ANY)
        return patterns

    @property
    def is_any_prefix(self) -> bool:
        return self.prefix == ANY

    # --- work queues ---
    def work(self, kind: WorkKind, region: str, priority: Priority) -> str:
        return f"{self.prefix}.{kind}.{check_token(region, 'region')}.{priority}"

    def request(self, region: str, priority: Priority) -> str:
        return self.work("req", region, priority)

    def decode(self, region: str, priority: Priority) -> str:
        return self.work("decode", region, priority)

    def doorbell(self, kind: WorkKind, region: str) -> str:
        return f"{self.prefix}.bell.{kind}.{check_token(region, 'region')}.*"

    def stream(self, kind: Literal["req", "decode", "dlq", "capture"]) -> str:
        if self.is_any_prefix:
            return ANY  # a stream name is one token: no pattern matches only `*_REQ`
        return f"{self.prefix.upper().replace('-', '_')}_{kind.upper()}"

    def stream_subjects(self, kind: WorkKind) -> str:
        return f"{self.prefix}.{kind}.>"

    def capture_copies(self, kind: WorkKind | None = None) -> str:
        return f"{self.prefix}.cap.{kind}.>" if kind else f"{self.prefix}.cap.>"

    def doorbells(self) -> str:
        return f"{self.prefix}.bell.>"

    def doorbells_of(self, kind: WorkKind) -> str:
        return f"{self.prefix}.bell.{kind}.>"

    def captured(self) -> list[str]:
        """Everything GS_CAPTURE stores."""
        return [self.capture_copies(), self.all_events(), self.all_cancels()]

    def consumer(self, kind: WorkKind, region: str, priority: Priority) -> str:
        return f"{kind}-{check_token(region, 'region')}-{priority}"

    # --- events back to the edge ---
    def events(self, edge_id: str, request_id: str) -> str:
        return f"{self.prefix}.evt.{check_token(edge_id, 'edge id')}.{check_token(request_id, 'request id')}"

    def events_of_edge(self, edge_id: str) -> str:
        return f"{self.prefix}.evt.{check_token(edge_id, 'edge id')}.*"

    def events_of_request(self, request_id: str) -> str:
        return f"{self.prefix}.evt.*.{check_token(request_id, 'request id')}"

    def all_events(self) -> str:
        return f"{self.prefix}.evt.>"

    def is_event_subject(self, subject: str, request_id: str) -> bool:
        """Events of a request go to `<prefix>.evt.<client>.<request_id>` and nowhere else, so
        everything said about one request can be found (and captured) by its id."""
        parts = subject.split(".")
        return (len(parts) == 4 and parts[0] == self.prefix and parts[1] == "evt"
                and bool(_TOKEN.match(parts[2])) and parts[3] == request_id)

    # --- captured copies and sandboxes ---
    def original_subject(self, subject: str) -> str:
        """`gs.cap.req.eu.batch` -> `gs.req.eu.batch`; other subjects are already original."""
        head = f"{self.prefix}.cap."
        return f"{self.prefix}.{subject[len(head):]}" if subject.startswith(head) else subject

    def moved_to(self, subject: str, other: "Subjects") -> str:
        """The same subject under another prefix (a sandbox), e.g. for replays."""
        if subject != self.prefix and not subject.startswith(self.prefix + "."):
            raise ValueError(f"{subject!r} is not under the prefix {self.prefix!r}")
        return other.prefix + subject[len(self.prefix):]

    # --- control ---
    def cancel(self, region: str) -> str:
        return f"{self.prefix}.cancel.{check_token(region, 'region')}"

    def all_cancels(self) -> str:
        return f"{self.prefix}.cancel.>"

    def heartbeat(self, region: str, role: str) -> str:
        return f"{self.prefix}.hb.{check_token(region, 'region')}.{check_token(role, 'role')}"

    def heartbeats(self, region: str) -> str:
        return f"{self.prefix}.hb.{check_token(region, 'region')}.*"

    def all_heartbeats(self) -> str:
        return f"{self.prefix}.hb.*.*"

    def heartbeats_of_role(self, role: str) -> str:
        return f"{self.prefix}.hb.*.{check_token(role, 'role')}"

    def max_deliveries_advisories(self, kind: WorkKind) -> str:
        """NATS's own advisory when a work message was delivered max_deliver times, unacked."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream(kind)}.*"

    def dead_letter(self, kind: str) -> str:
        return f"{self.prefix}.dlq.{check_token(kind, 'dead-letter kind')}"

    def dead_letters(self) -> str:
        return f"{self.prefix}.dlq.>"
