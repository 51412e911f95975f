"""Who may do what on the bus: the NATS subject permissions of each role, and the nats-server
`authorization` block that enforces them.

Pure functions of a `Subjects` (so of the prefix): nothing here talks to a server. What each role
does is the table of bus/topology.py (the same one the AsyncAPI document is written from); this
module says what that means on a NATS server:

  send a channel          publish to its addresses (the role's own only, for an `own` use)
  receive a channel       subscribe to them
  pull a channel          the JetStream API of its work queue: declare durable consumers, pull,
                          ack, delete a job nobody could finish (`take_work`)
  declare streams         create or update every stream (any process may be the first to start)
  read capture            short-lived consumers on the capture stream (`read_stream`)
  replies                 JetStream's answers on `_INBOX.>`
  queue depths            the work consumers' info (an edge's admission control)
  remake mirrors          delete a capture stream of a region named (an edge's mirror of another
                          region that stopped syncing, made again at once)
  everything              `>` (ops)

The embedded server (services/embedded.py), which `grokstack up` and the tests run, and a
production server (rendered by `grokstack nats-auth`, see infra/README.md) enforce the same table.

A server that serves one prefix gets that prefix's table, with JetStream API rights per stream
(an edge cannot pull decode jobs). A server that serves many prefixes at once (tests use one per
test; `grokstack up` may serve a sandbox prefix beside the live one) gets the table of
`Subjects.any_prefix()`: the same application rules with `*` for the prefix, and for stream
names, which are one token (`GS_REQ_eu`), so a pattern cannot single out some of them: the JetStream
API rights then cover every stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable

from bus.roles import ROLES, Role
from bus.subjects import ANY, Subjects, WorkKind
from bus.topology import Action, Capability, Channel, Owner, capabilities_of, uses_of, work_kinds

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


def declare_streams(subjects: Subjects, regions: tuple[str, ...]) -> list[str]:
    """Create or update the regions' streams, as every process does at start."""
    streams = sorted({subjects.stream(k, r) for k in ("req", "decode", "capture", "dlq") for r in regions})
    return [f"{_API}.STREAM.NAMES", f"{_API}.INFO"] + [
        f"{_API}.STREAM.{verb}.{stream}" for stream in streams for verb in ("INFO", "CREATE", "UPDATE")]


def read_stream(stream: str) -> list[str]:
    """Short-lived consumers on a stream (pull, push or ordered), single messages by sequence or
    last-by-subject (also from another region's JetStream domain, `$JS.<domain>.API`: a worker
    asks the client's region whether its job was taken over), and acking and flow control."""
    return [f"{_API}.CONSUMER.CREATE.{stream}", f"{_API}.CONSUMER.CREATE.{stream}.>",
            f"{_API}.CONSUMER.INFO.{stream}.*", f"{_API}.CONSUMER.DELETE.{stream}.*",
            f"{_API}.CONSUMER.MSG.NEXT.{stream}.*", f"{_API}.STREAM.MSG.GET.{stream}",
            f"$JS.*.API.STREAM.MSG.GET.{stream}",
            f"{_API}.DIRECT.GET.{stream}", f"{_API}.DIRECT.GET.{stream}.>",
            f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>"]


def take_work(subjects: Subjects, kind: WorkKind, region: str) -> list[str]:
    """Declare the durable work consumers of a kind, pull and ack (or nak, term, in-progress)
    its jobs, and remove a job nobody could finish (bus/exhausted.py)."""
    stream = subjects.stream(kind, region)
    return [*read_stream(stream), f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.*",
            f"{_API}.STREAM.MSG.DELETE.{stream}"]


_EVERYTHING = Permissions(publish=(">",), subscribe=(">",))

# What each capability of bus/topology.py takes on the server, for the streams of some regions.
_GRANTED: dict[Capability, Callable[[Subjects, tuple[str, ...]], Permissions]] = {
    "everything": lambda s, regions: _EVERYTHING,
    "declare streams": lambda s, regions: Permissions(publish=tuple(declare_streams(s, regions)), subscribe=()),
    "read capture": lambda s, regions: Permissions(
        publish=tuple(p for r in regions for p in read_stream(s.stream("capture", r))), subscribe=()),
    "replies": lambda s, regions: Permissions(publish=(), subscribe=(INBOXES,)),
    "remake mirrors": lambda s, regions: Permissions(
        publish=tuple(f"{_API}.STREAM.DELETE.{s.stream('capture', r)}" for r in regions), subscribe=()),
    "queue depths": lambda s, regions: Permissions(
        publish=tuple(f"{_API}.CONSUMER.INFO.{s.stream(kind, r)}.*" for kind in work_kinds() for r in regions),
        subscribe=()),
}


def _pull(subjects: Subjects, channel: Channel, owner: str | None, regions: tuple[str, ...]) -> Permissions:
    assert channel.work is not None  # bus/topology.py lets only work queues be pulled
    return Permissions(publish=tuple(p for r in regions for p in take_work(subjects, channel.work, r)),
                       subscribe=())


def _patterns(subjects: Subjects, channel: Channel, owner: str | None, regions: tuple[str, ...]) -> tuple[str, ...]:
    return _unique(channel.pattern(subjects, owner, r) for r in regions)


# What each action on a channel takes on the server, given whose addresses (None: all of them).
_DOES: dict[Action, Callable[[Subjects, Channel, str | None, tuple[str, ...]], Permissions]] = {
    "send": lambda s, channel, owner, regions: Permissions(
        publish=_patterns(s, channel, owner, regions), subscribe=()),
    "receive": lambda s, channel, owner, regions: Permissions(
        publish=(), subscribe=_patterns(s, channel, owner, regions)),
    "pull": _pull,
}


def _owners(role: Role, edge_id: str | None) -> dict[Owner, str | None]:
    """Whose addresses a login's `own` uses cover: its role's, its edge's (None: the shared edge
    login, any edge's), the kind of work it pulls."""
    return {"role": str(role), "client": None if edge_id == ANY else edge_id, "kind": ROLES[role].pulls}


def permissions(role: str, subjects: Subjects, edge_id: str | None = None,
                regions: tuple[str, ...] = (ANY,)) -> Permissions:
    """The subjects `role` may publish and subscribe to under `subjects`' prefix. `edge_id` limits
    an edge to its own events (`<prefix>.evt.*.<edge_id>.*`); None lets it read any edge's (one
    shared user for all edges). `regions`: those whose streams the server holds (its own, and
    the mirrors of others'); ANY, every stream (a stream name is one token, which a pattern
    cannot narrow to ours)."""
    role = check_role(role)
    rights = [_GRANTED[capability](subjects, regions) for capability in capabilities_of(role)]
    if _EVERYTHING in rights:
        return _EVERYTHING  # anything else would only repeat it
    owners = _owners(role, edge_id)
    for channel, use in uses_of(role):
        owner = owners[channel.owned_by] if use.own and channel.owned_by else None
        rights.append(_DOES[use.action](subjects, channel, owner, regions))
    return merged(*rights)


def merged(*parts: Permissions) -> Permissions:
    """One user's permissions from parts: a role's capabilities and uses of channels, or its
    permissions over several prefixes (a live prefix and its sandbox)."""
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


def role_users(passwords: dict[str, tuple[str, str]], prefixes: Iterable[Subjects],
               regions: tuple[str, ...] = (ANY,)) -> list[User]:
    """Users for role -> (user name, password) with the role's permissions under every prefix;
    an `edge:<id>` key is an edge confined to its own events (`edge_user_key`)."""
    prefixes = list(prefixes)
    users = []
    for key, (name, password) in passwords.items():
        role, _, edge_id = key.partition(":")
        users.append(User(name, password, merged(*(permissions(role, s, edge_id or None, regions)
                                                   for s in prefixes))))
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
