"""Who may do what on the bus: the NATS subject permissions of each role, and the nats-server
`authorization` block that enforces them.

Pure functions of a `Subjects` (so of the prefix): nothing here talks to a server. What each role
does is the table of bus/topology.py (the same one the AsyncAPI document is written from); this
module says what that means on a NATS server:

  send a channel          publish to its addresses (the role's own only, for an `own` use)
  receive a channel       subscribe to them
  pull a channel          the JetStream API of its work queue: declare durable consumers, pull,
                          ack, delete a job nobody could finish (`take_work`)
  declare streams         create or update every stream (`grokstack provision`, as ops)
  see streams             the info of the regions' streams (a runtime role waits for them at start)
  read capture            short-lived consumers on the capture stream (`read_stream`)
  replies                 JetStream's answers on `_INBOX.>`
  queue depths            the work consumers' info (an edge's admission control)
  remake mirrors          create, update or delete a capture stream of a region named (an edge's
                          mirror of another region, made again when it stopped syncing)
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
from bus.subjects import ANY, Subjects, WorkKind, check_token
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


def _streams(subjects: Subjects, regions: tuple[str, ...]) -> list[str]:
    return sorted({subjects.stream(k, r) for k in ("req", "decode", "capture", "dlq") for r in regions})


def declare_streams(subjects: Subjects, regions: tuple[str, ...]) -> list[str]:
    """Create or update the regions' streams (provisioning)."""
    return see_streams(subjects, regions) + [
        f"{_API}.STREAM.{verb}.{stream}" for stream in _streams(subjects, regions) for verb in ("CREATE", "UPDATE")]


def see_streams(subjects: Subjects, regions: tuple[str, ...]) -> list[str]:
    """The account's and the regions' streams' info, nothing more."""
    return [f"{_API}.STREAM.NAMES", f"{_API}.INFO"] + [
        f"{_API}.STREAM.INFO.{stream}" for stream in _streams(subjects, regions)]


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
    "see streams": lambda s, regions: Permissions(publish=tuple(see_streams(s, regions)), subscribe=()),
    "read capture": lambda s, regions: Permissions(
        publish=tuple(p for r in regions for p in read_stream(s.stream("capture", r))), subscribe=()),
    "replies": lambda s, regions: Permissions(publish=(), subscribe=(INBOXES,)),
    "remake mirrors": lambda s, regions: Permissions(
        publish=tuple(f"{_API}.STREAM.{verb}.{s.stream('capture', r)}" for r in regions
                      for verb in ("CREATE", "UPDATE", "DELETE")), subscribe=()),
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


def _owners(role: Role, edge_id: str | None, tenant: str | None) -> dict[Owner, str | None]:
    """Whose addresses a login's `own` uses cover: its role's, its edge's or client's (None: the
    shared edge login, any edge's), its tenant's, the kind of work it pulls."""
    return {"role": str(role), "client": None if edge_id == ANY else edge_id, "tenant": tenant,
            "kind": ROLES[role].pulls}


def permissions(role: str, subjects: Subjects, edge_id: str | None = None,
                regions: tuple[str, ...] = (ANY,), tenant: str | None = None,
                mirrored: tuple[str, ...] | None = None) -> Permissions:
    """The subjects `role` may publish and subscribe to under `subjects`' prefix. `edge_id` limits
    an edge to its own events (`<prefix>.evt.*.<edge_id>.*`); None lets it read any edge's (one
    shared user for all edges). A client is bound to one `tenant` and one client id (`edge_id`):
    it publishes that tenant's requests and reads that client's events. `regions`: those whose
    streams the server holds (its own, and the mirrors of others'); ANY, every stream (a stream
    name is one token, which a pattern cannot narrow to ours). `mirrored`: the regions whose
    captures an edge of this server mirrors (default: `regions`): the other regions, never the
    server's own, whose capture it must not touch; none on a server that is not one JetStream domain
    of several (with ANY the rights would cover every stream)."""
    role = check_role(role)
    if role == Role.CLIENT:
        if not tenant or not edge_id or ANY in (tenant, edge_id):
            raise ValueError("a client login is bound to one tenant and one client id: "
                             "credentials key client:<tenant>:<client_id>")
        check_token(tenant, "tenant"), check_token(edge_id, "client id")
    mirrored = regions if mirrored is None else mirrored
    rights = [_GRANTED[capability](subjects, mirrored if capability == "remake mirrors" else regions)
              for capability in capabilities_of(role) if mirrored or capability != "remake mirrors"]
    if _EVERYTHING in rights:
        return _EVERYTHING  # anything else would only repeat it
    owners = _owners(role, edge_id, tenant)
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
               regions: tuple[str, ...] = (ANY,), mirrored: tuple[str, ...] | None = None) -> list[User]:
    """Users for role -> (user name, password) with the role's permissions under every prefix;
    an `edge:<id>` key is an edge confined to its own events (`edge_user_key`), a
    `client:<tenant>:<id>` key a client bound to its tenant and id (`client_user_key`)."""
    prefixes = list(prefixes)
    users = []
    for key, (name, password) in passwords.items():
        role, edge_id, tenant = login_key_parts(key)
        users.append(User(name, password, merged(*(permissions(role, s, edge_id, regions, tenant, mirrored)
                                                   for s in prefixes))))
    return users


def login_key_parts(key: str) -> tuple[str, str | None, str | None]:
    """(role, edge or client id, tenant) of a credentials-file key: `edge`, `edge:<id>`,
    `client:<tenant>:<id>` ..."""
    role, _, rest = key.partition(":")
    if role == Role.CLIENT:
        tenant, _, client_id = rest.partition(":")
        return role, client_id or None, tenant or None
    return role, rest or None, None


def edge_user_key(edge_id: str) -> str:
    """The credentials-file key of one edge's own login; an edge with worker id `<id>` uses it
    before the shared `edge` one (bus/credentials.py)."""
    return f"edge:{edge_id}"


def client_user_key(tenant: str, client_id: str) -> str:
    """The credentials-file key of a client login bound to one tenant and one client id."""
    return f"client:{check_token(tenant, 'tenant')}:{check_token(client_id, 'client id')}"


def client_user_name(tenant: str, client_id: str) -> str:
    """Its NATS user name (`client-<tenant>-<id>`; ':' is kept out of names)."""
    return f"client-{check_token(tenant, 'tenant')}-{check_token(client_id, 'client id')}"


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
