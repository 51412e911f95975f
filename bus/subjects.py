"""Every NATS subject and JetStream name of the stack, built in one place.

Layout (prefix `gs` by default); every subject a stream stores names its region, and every
region has its own streams (`GS_REQ_<region>` ...), so regions share no stream even on one server,
and a region's streams never pull another region's traffic across the WAN:
  gs.req.<region>.<priority>.<tenant>.<request_id>
                                    chat requests        (stream GS_REQ_<region>, work queue)
  gs.decode.<region>.<priority>     decode jobs          (stream GS_DECODE_<region>, work queue)
  gs.cap.<kind>.<region>.<priority>[.<tenant>.<request_id>]
                                    full copies the work streams republish (GS_CAPTURE_<region>)
  gs.bell.<kind>.<region>.<priority>[...] header-only copies the capture republishes: wake-up calls
  gs.evt.<region>.<client>.<request_id>  token/final/error events back to the edge or client
                                    that asked, in the client's region (captured there)
  gs.cancel.<region>                cancellations, to every worker of a region (captured)
  gs.hb.<region>.<role>             worker heartbeats (not captured)
  gs.alive.<region>.<role>.<worker> each worker's liveness address: subscribed while its connection
                                    lives, so a probe there gets "no responders" once it died
  gs.region.<region>                a region's aggregate heartbeat, for every edge (not captured)
  gs.dlq.<region>.<kind>            dead letters          (stream GS_DLQ_<region>)

Work streams are work queues (a message is deleted once acked), so they cannot be the record of
what happened; GS_CAPTURE_<region> keeps copies of everything for replay and tracing, bounded by
age and size. A subject may belong to one stream only, hence the copies under `cap`.

A request's subject names its tenant and id: NATS permissions can then bind a direct publisher's
login to its tenant (bus/permissions.py), a worker checks the body says the same
(`check_request_subject`), and the captured copy of one request is found by its subject alone
(`captured_copies_of_request`: the server hands over its copies only, whatever else the
capture holds).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from bus.priorities import Priority

WorkKind = Literal["req", "decode"]
StreamKind = Literal["req", "decode", "dlq", "capture"]

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
        """The work of one kind and priority: the filter of its durable consumer."""
        tail = ".>" if kind == "req" else ""  # a request's subject goes on with its tenant and id
        return f"{self.prefix}.{kind}.{check_token(region, 'region')}.{check_token(priority, 'priority')}{tail}"

    def request(self, region: str, priority: Priority, tenant: str, request_id: str) -> str:
        return (f"{self.prefix}.req.{check_token(region, 'region')}.{check_token(priority, 'priority')}."
                f"{check_token(tenant, 'tenant')}.{check_token(request_id, 'request id')}")

    def requests_of_tenant(self, tenant: str) -> str:
        """A tenant's requests in any region and priority: a permission pattern."""
        return f"{self.prefix}.req.*.*.{check_token(tenant, 'tenant')}.*"

    def request_tokens(self, subject: str) -> tuple[str, str, str, str] | None:
        """(region, priority, tenant, request id) of a request subject, or of its captured copy;
        None when it is not one."""
        parts = self.original_subject(subject).split(".")
        if len(parts) != 6 or parts[0] != self.prefix or parts[1] != "req":
            return None
        return parts[2], parts[3], parts[4], parts[5]

    def captured_request(self, region: str, priority: Priority, tenant: str, request_id: str) -> str:
        """The capture's copy of one request: `capture_copies_in` applied to `request`."""
        return f"{self.prefix}.cap.{self.request(region, priority, tenant, request_id)[len(self.prefix) + 1:]}"

    def captured_copies_of_request(self, region: str, tenant: str, request_id: str) -> str:
        """The capture's copies of one request in a region, whatever its priority: a filter."""
        return (f"{self.prefix}.cap.req.{check_token(region, 'region')}.*.{check_token(tenant, 'tenant')}."
                f"{check_token(request_id, 'request id')}")

    def decode(self, region: str, priority: Priority) -> str:
        return self.work("decode", region, priority)

    def doorbell(self, kind: WorkKind, region: str) -> str:
        return f"{self.prefix}.bell.{kind}.{check_token(region, 'region')}.>"

    def stream(self, kind: StreamKind, region: str) -> str:
        """A region's stream of a kind. With any prefix or any region (ANY), every stream: a
        stream name is one token, so no pattern matches only `GS_REQ_*`."""
        if self.is_any_prefix or region == ANY:
            return ANY
        return f"{self.prefix.upper().replace('-', '_')}_{kind.upper()}_{check_token(region, 'region')}"

    def stream_subjects(self, kind: WorkKind, region: str) -> str:
        """What a region's work stream takes: exactly the shape of its subjects, so a publish to
        any other (an older layout, a typo) finds no stream and fails at once instead of waiting,
        stored, for a consumer that never takes it."""
        tail = ".*.*.*" if kind == "req" else ".*"  # <priority>[.<tenant>.<request_id>]
        return f"{self.prefix}.{kind}.{check_token(region, 'region')}{tail}"

    def capture_copies_from(self, kind: WorkKind, region: str) -> str:
        """Where a region's work stream republishes what `stream_subjects` takes: the same tokens
        under `cap` (a subject mapping of nats-server)."""
        tokens = 3 if kind == "req" else 1
        tail = "".join(f".{{{{wildcard({n})}}}}" for n in range(1, tokens + 1))
        return f"{self.prefix}.cap.{kind}.{check_token(region, 'region')}{tail}"

    def capture_copies_in(self, kind: WorkKind, region: str) -> str:
        """Where a region's work stream republishes its messages."""
        return f"{self.prefix}.cap.{kind}.{check_token(region, 'region')}.>"

    def all_work(self, kind: WorkKind) -> str:
        return f"{self.prefix}.{kind}.>"

    def capture_copies(self, kind: WorkKind | None = None) -> str:
        return f"{self.prefix}.cap.{kind}.>" if kind else f"{self.prefix}.cap.>"

    def capture_copies_of(self, region: str, kind: WorkKind | None = None) -> str:
        return f"{self.prefix}.cap.{kind or '*'}.{check_token(region, 'region')}.>"

    def doorbells(self) -> str:
        return f"{self.prefix}.bell.>"

    def doorbells_of(self, kind: WorkKind) -> str:
        return f"{self.prefix}.bell.{kind}.>"

    def doorbells_from_copies(self, region: str) -> str:
        """Where the capture republishes the copies of `capture_copies_of(region)`: the same
        kind, priority (and a request's tenant and id) under `bell` (a subject mapping of nats-server)."""
        return f"{self.prefix}.bell.{{{{wildcard(1)}}}}.{check_token(region, 'region')}.>"

    def captured(self, region: str) -> list[str]:
        """Everything a region's capture stream stores."""
        return [self.capture_copies_of(region), self.region_events(region), self.cancel(region)]

    def consumer(self, kind: WorkKind, region: str, priority: Priority) -> str:
        return f"{kind}-{check_token(region, 'region')}-{priority}"

    # --- events back to the edge ---
    def events(self, region: str, client: str, request_id: str) -> str:
        return (f"{self.prefix}.evt.{check_token(region, 'region')}.{check_token(client, 'edge id')}."
                f"{check_token(request_id, 'request id')}")

    def events_of_edge(self, region: str, client: str) -> str:
        return f"{self.prefix}.evt.{check_token(region, 'region')}.{check_token(client, 'edge id')}.*"

    def events_of_client(self, client: str) -> str:
        """A client's events in any region: a permission pattern."""
        return f"{self.prefix}.evt.*.{check_token(client, 'edge id')}.*"

    def events_of_request(self, request_id: str) -> str:
        return f"{self.prefix}.evt.*.*.{check_token(request_id, 'request id')}"

    def region_events(self, region: str) -> str:
        return f"{self.prefix}.evt.{check_token(region, 'region')}.>"

    def all_events(self) -> str:
        return f"{self.prefix}.evt.>"

    def is_event_subject(self, subject: str, request_id: str) -> bool:
        """Events of a request go to `<prefix>.evt.<region>.<client>.<request_id>` and nowhere
        else, so everything said about one request can be found (and captured) by its id."""
        parts = subject.split(".")
        return (len(parts) == 5 and parts[0] == self.prefix and parts[1] == "evt"
                and bool(_TOKEN.match(parts[2])) and bool(_TOKEN.match(parts[3])) and parts[4] == request_id)

    def event_region(self, subject: str) -> str:
        """The region of an event subject (whose capture stores it)."""
        return subject.split(".")[2]

    # --- captured copies and sandboxes ---
    def original_subject(self, subject: str) -> str:
        """`gs.cap.req.eu.batch.acme.r1` -> `gs.req.eu.batch.acme.r1`; others are already original."""
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

    def alive(self, region: str, role: str, worker: str) -> str:
        """A worker's liveness address. Its last token stands for the worker's name (a host name
        may hold dots), the first 16 hex digits of its SHA-256, unless it is a token already."""
        token = worker if _TOKEN.match(worker) else hashlib.sha256(worker.encode()).hexdigest()[:16]
        return f"{self.prefix}.alive.{check_token(region, 'region')}.{check_token(role, 'role')}.{token}"

    def liveness_of_role(self, role: str) -> str:
        return f"{self.prefix}.alive.*.{check_token(role, 'role')}.*"

    def region_beat(self, region: str) -> str:
        return f"{self.prefix}.region.{check_token(region, 'region')}"

    def region_beats(self) -> str:
        return f"{self.prefix}.region.*"

    def max_deliveries_advisories(self, kind: WorkKind, region: str) -> str:
        """NATS's own advisory when a work message was delivered max_deliver times, unacked."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream(kind, region)}.*"

    def dead_letter(self, region: str, kind: str) -> str:
        return f"{self.prefix}.dlq.{check_token(region, 'region')}.{check_token(kind, 'dead-letter kind')}"

    def dead_letters(self, region: str) -> str:
        return f"{self.prefix}.dlq.{check_token(region, 'region')}.*"

    def all_dead_letters(self) -> str:
        return f"{self.prefix}.dlq.>"
