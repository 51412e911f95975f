"""Who may do what on the bus: the NATS subject permissions of each role, and the nats-server
`authorization` block that enforces them.

Pure functions of a `Subjects` (so of the prefix): nothing here talks to a server. The embedded
server (services/embedded.py), which `grokstack up` and the tests run, and a production server
(rendered by `grokstack nats-auth`, see infra/README.md) enforce the same table:

  edge        publishes requests and cancels; reads its own token events, heartbeats and queue depths
  prefill     pulls and acks requests; publishes decode jobs, events, heartbeats, dead letters
  decode      pulls and acks decode jobs; publishes events, heartbeats, dead letters
  aggregated  pulls and acks requests; publishes events, heartbeats, dead letters
  ops         everything: `grokstack publish/replay/trace`, JobClient, chaos tools, tests

Every role also declares the streams (any process may be the first to start), reads the capture
stream through its own short-lived consumers (resume after an edge failover, decode migration,
the last event of an exhausted job), and gets JetStream's answers on `_INBOX.>`.

A server that serves one prefix gets that prefix's table, with JetStream API rights per stream
(an edge cannot pull decode jobs). A server that serves many prefixes at once (tests use one per
test; `grokstack up` may serve a sandbox prefix beside the live one) gets the table of
`Subjects.any_prefix()`: the same application rules with `*` for the prefix, and for stream
names, which are one token (`GS_REQ`), so a pattern cannot single out some of them: the JetStream
API rights then cover every stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from bus.roles import ROLES, Role
from bus.subjects import ANY, Subjects, WorkKind

INBOXES = "_INBOX.>"  # nats-py's replies: JetStream API answers, publish acks, pulled messages
_API = "$JS.API"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def as_config(self) -> dict:
        return {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ValueError(f"unknown bus role {role!r}: one of {', '.join(ROLES)}") from None


def declare_streams(subjects: Subjects) -> list[str]:
    """Create or update the stack's streams, as every process does at start."""
    streams = sorted({subjects.stream(k) for k in ("req", "decode", "capture", "dlq")})
    return [f"{_API}.STREAM.NAMES", f"{_API}.INFO"] + [
        f"{_API}.STREAM.{verb}.{stream}" for stream in streams for verb in ("INFO", "CREATE", "UPDATE")]


def read_stream(stream: str) -> list[str]:
    """Short-lived consumers on a stream (pull, push or ordered), single messages by sequence or
    last-by-subject, and acking and flow control for them."""
    return [f"{_API}.CONSUMER.CREATE.{stream}", f"{_API}.CONSUMER.CREATE.{stream}.>",
            f"{_API}.CONSUMER.INFO.{stream}.*", f"{_API}.CONSUMER.DELETE.{stream}.*",
            f"{_API}.CONSUMER.MSG.NEXT.{stream}.*", f"{_API}.STREAM.MSG.GET.{stream}",
            f"{_API}.DIRECT.GET.{stream}", f"{_API}.DIRECT.GET.{stream}.>",
            f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>"]


def take_work(subjects: Subjects, kind: WorkKind) -> list[str]:
    """Declare the durable work consumers of a kind, pull and ack (or nak, term, in-progress)
    its jobs, and remove a job nobody could finish (bus/exhausted.py)."""
    stream = subjects.stream(kind)
    return [*read_stream(stream), f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.*",
            f"{_API}.STREAM.MSG.DELETE.{stream}"]


def permissions(role: str, subjects: Subjects, edge_id: str | None = None) -> Permissions:
    """The subjects `role` may publish and subscribe to under `subjects`' prefix. `edge_id` limits
    an edge to its own events (`<prefix>.evt.<edge_id>.*`); None lets it read any edge's (one
    shared user for all edges)."""
    role = check_role(role)
    if role == Role.OPS:
        return Permissions(publish=(">",), subscribe=(">",))
    capture = subjects.stream("capture")
    publish = [*declare_streams(subjects), *read_stream(capture)]
    subscribe = [INBOXES]
    if role == Role.EDGE:
        publish += [subjects.stream_subjects("req"), subjects.all_cancels(),
                    # the work queues' depth, for admission control (edge/queues.py)
                    *(f"{_API}.CONSUMER.INFO.{subjects.stream(kind)}.*" for kind in ("req", "decode"))]
        events = subjects.all_events() if edge_id is None or edge_id == ANY else subjects.events_of_edge(edge_id)
        subscribe += [events, subjects.all_heartbeats()]
    else:
        kind = ROLES[role].pulls
        assert kind is not None
        publish += [*take_work(subjects, kind), subjects.all_events(),
                    subjects.heartbeats_of_role(role), subjects.dead_letters()]
        if role == Role.PREFILL:
            publish.append(subjects.stream_subjects("decode"))
        subscribe += [subjects.doorbells_of(kind), subjects.all_cancels(),
                      subjects.max_deliveries_advisories(kind)]
    return Permissions(publish=_unique(publish), subscribe=_unique(subscribe))


def merged(*parts: Permissions) -> Permissions:
    """One user's permissions over several prefixes (a live prefix and its sandbox)."""
    return Permissions(publish=_unique(p for part in parts for p in part.publish),
                       subscribe=_unique(s for part in parts for s in part.subscribe))


@dataclass(frozen=True)
class User:
    """One entry of the server's user list. `password` is written as given: plain for the
    embedded server (its config file is private to its data directory), or a bcrypt hash
    (`nats server passwd`) for production."""
    name: str
    password: str
    permissions: Permissions

    def __repr__(self) -> str:  # never print a password
        return f"User(name={self.name!r}, password='***')"


def role_users(passwords: dict[str, tuple[str, str]], prefixes: Iterable[Subjects]) -> list[User]:
    """Users for role -> (user name, password) with the role's permissions under every prefix;
    an `edge:<id>` key is an edge confined to its own events (`edge_user_key`)."""
    prefixes = list(prefixes)
    users = []
    for key, (name, password) in passwords.items():
        role, _, edge_id = key.partition(":")
        users.append(User(name, password, merged(*(permissions(role, s, edge_id or None) for s in prefixes))))
    return users


def edge_user_key(edge_id: str) -> str:
    """The credentials-file key of one edge's own login; an edge with worker id `<id>` uses it
    before the shared `edge` one (bus/credentials.py)."""
    return f"edge:{edge_id}"


def authorization_block(users: Iterable[User]) -> str:
    """The nats-server `authorization { users = [...] }` block. Strings are JSON-quoted, which
    nats-server's config format reads as is; quoting also keeps `$JS...` from being read as a
    variable reference."""
    entries = [{"user": u.name, "password": u.password, "permissions": u.permissions.as_config()}
               for u in users]
    body = ",\n".join("    " + json.dumps(e) for e in entries)
    return f"authorization {{\n  users = [\n{body}\n  ]\n}}\n"


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
