"""Who sends and receives what on the bus, as one table: the channels (the subjects of one kind of
message), what each role does with each, and what a role may do beside them.

bus/permissions.py turns the table into each role's NATS permissions, and bus/contract.py into
the AsyncAPI document's channels and operations, so the two cannot disagree: adding a subject or
a role is a change here (a new role also gets its row in bus/roles.py).

A role does one of three things with a channel:

  send     publishes to it
  receive  subscribes to it
  pull     takes its jobs from the JetStream work queue that stores it (durable consumers, pull,
           ack, delete), never by subscribing to the subject itself

A use may be limited to the role's own addresses of the channel (`own`); what "own" means is the
channel's `owned_by`: a worker beats only as its own role, an edge with a login of its own (and
every client login) reads only its own events, a client publishes only its tenant's requests, a
worker wakes up only for the kind of work it pulls.

Capabilities are what a role may do beside the channels; bus/permissions.py says which JetStream
API subjects each one takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from bus import messages as m
from bus.roles import RUNTIME_ROLES, WORKER_ROLES, Role, roles_pulling
from bus.subjects import ANY, Subjects, WorkKind

Action = Literal["send", "receive", "pull"]
# The token of an address that says whose it is: a role, a client (an edge or a JobClient), a
# tenant or a kind of work. The names are those of the `Tokens` fields that hold it.
Owner = Literal["role", "client", "tenant", "kind"]
Capability = Literal["everything", "declare streams", "see streams", "read capture", "replies", "queue depths",
                     "remake mirrors"]


@dataclass(frozen=True)
class Tokens:
    """The variable tokens of one address: real values to build a subject, or placeholders
    (bus/contract.py) to write the address down with its parameters."""
    region: str
    priority: str
    client: str
    tenant: str
    request_id: str
    role: str
    kind: str
    consumer: str
    worker: str


@dataclass(frozen=True)
class Use:
    """What some roles do with a channel. `summary` is the operation's in the AsyncAPI document."""
    action: Action
    roles: tuple[Role, ...]
    summary: str
    own: bool = False  # only the role's own addresses of the channel (its `owned_by`)


@dataclass(frozen=True)
class Channel:
    name: str  # the AsyncAPI channel's
    description: str
    messages: tuple[type[m.Message], ...]  # none: a header-only message, or one of NATS's own
    address: Callable[[Subjects, Tokens], str]  # the subject of one message
    # Every address, as a permission pattern; None when no one pattern covers only ours.
    everywhere: Callable[[Subjects], str] | None
    uses: tuple[Use, ...]
    owned_by: Owner | None = None
    # The addresses of one owner in one region (ANY: every region).
    own: Callable[[Subjects, str, str], str] | None = None
    work: WorkKind | None = None  # the work queue that stores it, which `pull` takes jobs from

    def __post_init__(self) -> None:
        for use in self.uses:
            if use.action == "pull" and self.work is None:
                raise ValueError(f"{self.name}: only a work queue can be pulled")
            if use.own and (self.owned_by is None or self.own is None):
                raise ValueError(f"{self.name}: says nothing about whose addresses are whose")
            if not use.own and use.action != "pull" and self.everywhere is None:
                raise ValueError(f"{self.name}: a use of every address needs the `everywhere` pattern")

    def pattern(self, subjects: Subjects, owner: str | None = None, region: str = ANY) -> str:
        """The addresses of one owner in a region, or every address (owner None)."""
        if owner is None:
            assert self.everywhere is not None
            return self.everywhere(subjects)
        assert self.own is not None
        return self.own(subjects, owner, region)


@dataclass(frozen=True)
class Operation:
    """One role's use of one channel: an operation of the AsyncAPI document."""
    role: Role
    action: Action
    channel: str
    summary: str

    @property
    def name(self) -> str:
        return f"{self.role}.{self.action}.{self.channel}"


@dataclass(frozen=True)
class Grant:
    capability: Capability
    roles: tuple[Role, ...]
    why: str


def _filled(pattern: str, *tokens: str) -> str:
    """One subject of a pattern that ends in a wildcard (`gs.cap.req.>` + eu, batch)."""
    return pattern[:-1] + ".".join(tokens)


def _named(kind: str) -> str:
    """A region's stream as it is named with the default prefix, for the descriptions."""
    return Subjects().stream(kind, "REGION").replace("REGION", "<region>")  # type: ignore[arg-type]
CLIENTS = (Role.EDGE, Role.OPS, Role.CLIENT)  # who submits jobs: the edge, JobClient, `grokstack publish`

CHANNELS: tuple[Channel, ...] = (
    Channel(
        "requests",
        "Chat requests for the prefill pool, in the JetStream work queue "
        f"{_named('req')}: an accepted request survives a worker's death.",
        (m.ChatRequest,),
        address=lambda s, t: s.request(t.region, t.priority, t.tenant, t.request_id),  # type: ignore[arg-type]
        everywhere=lambda s: s.all_work("req"), work="req", owned_by="tenant",
        own=lambda s, tenant, region: s.requests_of_tenant(tenant),
        uses=(Use("send", (Role.EDGE, Role.OPS), "The edge (or an operator) submits a job of any tenant."),
              Use("send", (Role.CLIENT,), "A back-end service submits a job of its own tenant only; "
                  "workers refuse a request whose body names another tenant or id than its subject.",
                  own=True),
              Use("pull", roles_pulling("req"), "Workers that prefill take requests by priority."))),
    Channel(
        "decodeJobs",
        f"Prefill -> decode hand-over with the KV handle (work queue {_named('decode')}).",
        (m.DecodeJob,),
        address=lambda s, t: s.decode(t.region, t.priority),  # type: ignore[arg-type]
        everywhere=lambda s: s.all_work("decode"), work="decode",
        uses=(Use("send", (Role.PREFILL,), "Prefill publishes the decode job."),
              Use("pull", roles_pulling("decode"), "Decode workers take decode jobs by priority."))),
    Channel(
        "events",
        "Token events of one request, numbered by seq from 0; then one final or error event. "
        "The request's reply_to must be exactly this subject; its region is the client's, whose "
        "capture stores them, wherever the request is served.",
        (m.TokenEvent, m.FinalEvent, m.ErrorEvent),
        address=lambda s, t: s.events(t.region, t.client, t.request_id),
        everywhere=lambda s: s.all_events(), owned_by="client",
        own=lambda s, client, region: s.events_of_client(client),
        uses=(Use("send", WORKER_ROLES, "Workers publish token, final and error events."),
              # The shared edge login reads any edge's events, to adopt a request after a failover.
              Use("receive", CLIENTS, "The client reads its job's tokens and outcome.", own=True))),
    Channel(
        "cancels",
        "Stop a request wherever it is.",
        (m.Cancel,),
        address=lambda s, t: s.cancel(t.region),
        everywhere=lambda s: s.all_cancels(),
        uses=(Use("send", CLIENTS, "A client gives up on a job."),
              Use("receive", WORKER_ROLES, "Workers stop the request, whichever of them holds it."))),
    Channel(
        "heartbeats",
        "Each worker, every GROKSTACK_HEARTBEAT_S seconds.",
        (m.Heartbeat,),
        address=lambda s, t: s.heartbeat(t.region, t.role),
        everywhere=lambda s: s.all_heartbeats(), owned_by="role",
        own=lambda s, role, region: s.heartbeats_of_role(role),
        uses=(Use("send", WORKER_ROLES, "Workers announce they are alive, each as its own role only.", own=True),
              Use("receive", (Role.EDGE,), "The edge sees which stages of its region are served, and how fast."),
              Use("receive", WORKER_ROLES, "A worker keeps the last beat of each peer of its pool (the jobs it "
                  "holds), to hand them on the moment it dies (inference/peer_watch.py).", own=True))),
    Channel(
        "liveness",
        "Each worker's own address, subscribed for as long as its connection lives: a probe there (a "
        "request) gets NATS's no-responders answer within a round trip once the worker is gone; a live "
        "worker answers it from its event loop, to the prober's own address.",
        (m.LivenessProbe, m.LivenessAnswer),
        address=lambda s, t: s.alive(t.region, t.role, t.worker),
        everywhere=None, owned_by="role",
        own=lambda s, role, region: s.liveness_of_role(role),
        uses=(Use("receive", WORKER_ROLES, "A worker holds its own liveness address.", own=True),
              Use("send", WORKER_ROLES, "A worker probes the peer of its pool it watches, and answers the "
                  "probes of the one that watches it.", own=True))),
    Channel(
        "regionBeats",
        "Each region's state (live workers, queue waits, draining, model, JetStream domain) from each "
        "edge that sees its workers, every GROKSTACK_REGION_BEAT_S seconds: how edges choose a region, "
        "and notice one die.",
        (m.RegionBeat,),
        address=lambda s, t: s.region_beat(t.region),
        everywhere=lambda s: s.region_beats(),
        uses=(Use("send", (Role.EDGE,), "An edge tells every region what it sees of its own."),
              Use("receive", (Role.EDGE,), "Every edge hears every region, its own included."))),
    Channel(
        "deadLetters",
        f"What could not be served and why (stream {_named('dlq')}, which `grokstack trace` reads).",
        (m.DeadLetter,),
        address=lambda s, t: s.dead_letter(t.region, t.kind),
        everywhere=lambda s: s.all_dead_letters(),
        uses=(Use("send", WORKER_ROLES, "Workers record a message they cannot serve."),)),
    Channel(
        "captureCopies",
        "Full copies of the work messages, kept with the events and cancels in "
        f"{_named('capture')} for replay and tracing; a request's copy goes on with its "
        "`.<tenant>.<request_id>`, so one request is found by its subject. Read only, through the "
        "stream: by `grokstack replay` and `trace`, by an edge that adopts another edge's request, "
        "by workers; never by a client login (it holds every tenant's prompts).",
        (m.ChatRequest, m.DecodeJob),
        address=lambda s, t: _filled(s.capture_copies(t.kind), t.region, t.priority),  # type: ignore[arg-type]
        everywhere=lambda s: s.capture_copies(),
        uses=()),
    Channel(
        "doorbells",
        f"Header-only copies {_named('capture')} republishes of each new work message, no "
        "payload (a request's goes on with `.<tenant>.<request_id>`): an idle worker sleeps until "
        "one rings instead of polling.",
        (),
        address=lambda s, t: _filled(s.doorbell(t.kind, t.region), t.priority),  # type: ignore[arg-type]
        everywhere=lambda s: s.doorbells(), owned_by="kind",
        own=lambda s, kind, region: s.doorbells_of(kind),  # type: ignore[arg-type]
        uses=(Use("receive", WORKER_ROLES, "An idle worker wakes up when work of its kind arrives.", own=True),)),
    Channel(
        "maxDeliveries",
        "NATS's advisory (io.nats.jetstream.advisory.v1.max_deliver) that a work message was delivered "
        "GROKSTACK_MAX_DELIVER times and never acked: its worker died each time.",
        (),
        address=lambda s, t: _filled(s.max_deliveries_advisories(t.kind, t.region), t.consumer),  # type: ignore[arg-type]
        everywhere=None,  # stream names are not under the prefix: ours cannot be told apart by a pattern
        owned_by="kind",
        own=lambda s, kind, region: s.max_deliveries_advisories(kind, region),  # type: ignore[arg-type]
        uses=(Use("receive", WORKER_ROLES, "Workers dead-letter a job that no worker survived, tell its "
                  "client and delete it (bus/exhausted.py).", own=True),)),
)

GRANTS: tuple[Grant, ...] = (
    Grant("everything", (Role.OPS,),
          "operators: `grokstack provision/replay/trace`, chaos tools, tests"),
    # One explicit step (services/provision.py), so the last process to start cannot rewrite the
    # fleet's stream limits, nor the internet-facing edge any stream's config.
    Grant("declare streams", (Role.OPS,), "`grokstack provision` creates the streams and updates their limits"),
    Grant("see streams", RUNTIME_ROLES, "a process waits at start until its streams exist (provisioned)"),
    Grant("read capture", RUNTIME_ROLES, "short-lived consumers on the capture stream: an edge adopting another's "
          "request after a failover, decode migration, the last event of an exhausted job (not clients: "
          "it holds every tenant's prompts)"),
    Grant("replies", tuple(Role), "JetStream's answers, publish acks and pulled messages come to an inbox"),
    Grant("queue depths", (Role.EDGE,), "the work queues' depth, for admission control (edge/queues.py)"),
    Grant("remake mirrors", (Role.EDGE,), "make a mirror of another region's capture, and delete one that stopped "
          "syncing to make it again (edge/gateway.py; the capture streams of the regions named, the server's "
          "own included: one pattern cannot tell them apart)"),
)

OPERATIONS: tuple[Operation, ...] = tuple(
    Operation(role, use.action, channel.name, use.summary)
    for channel in CHANNELS for use in channel.uses for role in use.roles)


def channel_named(name: str) -> Channel:
    return next(c for c in CHANNELS if c.name == name)


def uses_of(role: Role) -> list[tuple[Channel, Use]]:
    return [(c, use) for c in CHANNELS for use in c.uses if role in use.roles]


def capabilities_of(role: Role) -> tuple[Capability, ...]:
    return tuple(g.capability for g in GRANTS if role in g.roles)


def roles_that(action: Action, channel: str) -> tuple[Role, ...]:
    return tuple(dict.fromkeys(op.role for op in OPERATIONS if op.action == action and op.channel == channel))


def work_kinds() -> tuple[WorkKind, ...]:
    """The kinds of work queue, in the table's order."""
    return tuple(c.work for c in CHANNELS if c.work is not None)
