"""How a process proves its role to NATS, and keeping secrets out of logs.

The credentials file is JSON, one entry per role (see bus/permissions.py):

    {"edge":    {"user": "edge", "password": "..."},
     "prefill": {"creds": "/etc/grokstack/prefill.creds"},    # NATS JWT + nkey (decentralized auth)
     "decode":  {"nkey": "/etc/grokstack/decode.nk"},          # an nkey seed file
     "client:acme:billing": {"user": "client-acme-billing", "password": "..."}}

A `client:<tenant>:<client_id>` entry is a back-end service's login, bound to that tenant and
client id (bus/permissions.py); `edge:<id>` an edge's own login.

The embedded server writes one with every role and random passwords (mode 0600, in its data
directory); in production each machine gets a file with only the roles it runs.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus.config import BusConfig
from bus.roles import ROLES, Role

__all__ = ["BusAuth", "CredentialsError", "NatsLogin", "client_login", "generate_logins", "load_logins", "save_logins",
           "tls_context", "write_private"]


class CredentialsError(RuntimeError):
    pass


@dataclass(frozen=True)
class NatsLogin:
    user: str = ""
    password: str = field(default="", repr=False)
    creds: str = ""  # a .creds file: a user JWT and its nkey seed
    nkey: str = ""  # an nkey seed file

    def connect_options(self) -> dict[str, Any]:
        if self.creds:
            return {"user_credentials": self.creds}
        if self.nkey:
            return {"nkeys_seed": self.nkey}
        return {"user": self.user, "password": self.password}

    def as_json(self) -> dict[str, str]:
        return {k: v for k, v in (("user", self.user), ("password", self.password),
                                  ("creds", self.creds), ("nkey", self.nkey)) if v}


def generate_logins(roles: tuple[str, ...] = tuple(r for r in ROLES if r != Role.CLIENT)) -> dict[str, NatsLogin]:
    """A user per role named after it, with a random password (client logins are each bound to a
    tenant and an id: made one by one, `client_login`)."""
    return {str(role): NatsLogin(user=str(role), password=secrets.token_urlsafe(24)) for role in roles}


def client_login(tenant: str, client_id: str) -> tuple[str, NatsLogin]:
    """The credentials-file key and a new login of a client bound to `tenant` and `client_id`."""
    from bus.permissions import client_user_key, client_user_name  # permissions imports the table

    return client_user_key(tenant, client_id), NatsLogin(user=client_user_name(tenant, client_id),
                                                        password=secrets.token_urlsafe(24))


def save_logins(path: Path, logins: dict[str, NatsLogin]) -> None:
    write_private(path, json.dumps({role: login.as_json() for role, login in logins.items()},
                                   indent=2) + "\n")


def load_logins(path: Path) -> dict[str, NatsLogin]:
    try:
        raw = json.loads(Path(path).read_text())
        return {role: NatsLogin(**{k: str(v) for k, v in entry.items()}) for role, entry in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CredentialsError(f"cannot read NATS credentials from {path}: {type(exc).__name__}: {exc}") from None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, replacing any earlier one in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class BusAuth:
    """What `bus.jetstream.connect` needs to log in as one role: the role's login (None: connect
    without one, e.g. to a dev server without authorization) and a TLS context (None: plain TCP,
    or nats-py's default context for a `tls://` URL)."""
    role: Role
    login: NatsLogin | None = None
    tls: ssl.SSLContext | None = None
    # A client login's binding (`client:<tenant>:<client_id>`): its JobClient publishes as them.
    tenant: str = ""
    client_id: str = ""

    @classmethod
    def of(cls, bus: BusConfig, role: Role | str, tenant: str = "", client_id: str = "") -> "BusAuth":
        """The role's login in `bus.credentials_file`. A client's is the `client:<tenant>:<id>`
        entry that matches `tenant` and `client_id` (either may be left out when only one does)."""
        role = Role(role)
        path = bus.credentials_file
        login = None
        if path is not None:
            logins = load_logins(path)
            if role == Role.CLIENT:
                key, login = _client_entry(path, logins, tenant, client_id)
                _, tenant, client_id = key.split(":", 2)
                return cls(role, login, tls_context(bus), tenant, client_id)
            # a login of this very process (`edge:<worker id>`, see permissions.edge_user_key)
            # comes before its role's shared one
            login = logins.get(f"{role}:{bus.worker_id}") or logins.get(role)
            if login is None:
                raise CredentialsError(f"{path} has no NATS login for the role {str(role)!r} "
                                       f"(it has: {', '.join(logins) or 'none'})")
        return cls(role, login, tls_context(bus), tenant, client_id)

    def connect_options(self) -> dict[str, Any]:
        options: dict[str, Any] = self.login.connect_options() if self.login else {}
        if self.tls is not None:
            options["tls"] = self.tls
        return options


def _client_entry(path: Path, logins: dict[str, NatsLogin], tenant: str,
                  client_id: str) -> tuple[str, NatsLogin]:
    found = [key for key in logins if key.startswith("client:") and key.count(":") == 2
             and (not tenant or key.split(":")[1] == tenant) and (not client_id or key.split(":")[2] == client_id)]
    if len(found) != 1:
        wanted = f"client:{tenant or '<tenant>'}:{client_id or '<client_id>'}"
        raise CredentialsError(f"{path} has {len(found) or 'no'} NATS client logins matching {wanted} (one is "
                               f"needed; it has: {', '.join(logins) or 'none'})")
    return found[0], logins[found[0]]


def tls_context(bus: BusConfig) -> ssl.SSLContext | None:
    """A client context that trusts `nats_tls_ca` and shows `nats_tls_cert` (mutual TLS), when
    either is set."""
    if not (bus.nats_tls_ca or bus.nats_tls_cert):
        return None
    context = ssl.create_default_context(cafile=bus.nats_tls_ca or None)
    if bus.nats_tls_cert:
        context.load_cert_chain(bus.nats_tls_cert, bus.nats_tls_key or None)
    return context
