"""API keys -> tenants, and what each tenant may do.

The keys file holds only SHA-256 hashes of the keys (a leaked file gives no usable key):

    {"tenants": [{"name": "acme", "priorities": ["interactive", "standard"],
                  "max_concurrent": 32, "tokens_per_minute": 200000, "keys": ["sha256:9f86d0…"]}]}

`grokstack apikey --tenant acme` makes a key, prints it once and adds its hash. With no keys
file the edge is open: every caller is tenant "public" with every priority.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from bus.priorities import PRIORITIES, Priority

KEY_PREFIX = "gsk_"


class Tenant(Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # a subject token (bus/subjects.py)
    priorities: Annotated[list[Priority], Meta(min_length=1)] = msgspec.field(default_factory=lambda: list(PRIORITIES))
    max_concurrent: Annotated[int, Meta(ge=1)] = 64
    # Prompt plus answer tokens a minute, per edge (0: no limit); over it requests are refused
    # with `rate_limited` and a retry-after (edge/admission.py).
    tokens_per_minute: Annotated[int, Meta(ge=0)] = 0
    keys: list[Annotated[str, Meta(pattern=r"^sha256:[0-9a-f]{64}$")]] = []

    @property
    def default_priority(self) -> Priority:
        """The most urgent priority the tenant may use."""
        return min(self.priorities, key=PRIORITIES.index)


class KeysFile(Struct, forbid_unknown_fields=True):
    tenants: list[Tenant] = []


PUBLIC = Tenant(name="public", max_concurrent=1_000_000)


class AuthError(Exception):
    pass


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, tenants: list[Tenant] | None) -> None:
        self.required = tenants is not None
        self._by_hash = {h: t for t in tenants or [] for h in t.keys}

    @classmethod
    def load(cls, path: str) -> "ApiKeys":
        if not path:
            return cls(None)
        try:
            data = msgspec.json.decode(Path(path).read_bytes(), type=KeysFile)
        except (OSError, msgspec.DecodeError) as exc:
            raise SystemExit(f"cannot read the API keys file {path}: {exc}") from None
        return cls(data.tenants)

    def tenant_for(self, authorization: str | None) -> Tenant:
        """The tenant of an `Authorization: Bearer <key>` header value; AuthError if none."""
        if not self.required:
            return PUBLIC
        if not authorization:
            raise AuthError("an API key is required: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("the Authorization header must be 'Bearer <key>'")
        return self.tenant_for_key(key.strip())

    def tenant_for_key(self, key: str) -> Tenant:
        tenant = self._by_hash.get(key_hash(key))
        if tenant is None:
            raise AuthError("the API key is not valid")
        return tenant


def add_key(path: Path, tenant: str, priorities: list[str], max_concurrent: int,
            tokens_per_minute: int | None = None) -> str:
    """Make a new key for `tenant` (created if new), store its hash, return the key."""
    data = msgspec.json.decode(path.read_bytes(), type=KeysFile) if path.exists() else KeysFile()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    others = [t for t in data.tenants if t.name != tenant]
    old = next((t for t in data.tenants if t.name == tenant), None)
    updated = msgspec.convert({"name": tenant, "priorities": priorities or (old.priorities if old else
                                                                         list(PRIORITIES)),
                               "max_concurrent": max_concurrent or (old.max_concurrent if old else 64),
                               "tokens_per_minute": (tokens_per_minute if tokens_per_minute is not None
                                                     else old.tokens_per_minute if old else 0),
                               "keys": [*(old.keys if old else []), key_hash(key)]}, Tenant)
    data.tenants = [*others, updated]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(msgspec.to_builtins(data), indent=2) + "\n")
    path.chmod(0o600)
    return key
