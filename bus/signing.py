"""The stack's signing secret, and the tags made with it.

One secret, shared by every process of every region (a Kubernetes Secret, or the file
`grokstack up` makes in its data directory), signs what the stack hands out or stores and must
know again as its own: a resume token (edge/live.py: only the client that was told it can follow
a request again), and the integrity tag of a KV block in Redis (kv_store/: a block planted or
corrupted there is a miss and a recompute). Each use names its `purpose`, so a tag made for one
can never pass as another's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_BYTES = 32


class SecretError(RuntimeError):
    """The secret file cannot be read, or is too short to sign with."""


class Signer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise SecretError(f"the stack secret must hold at least 16 bytes; it holds {len(key)}")
        self._key = key

    @classmethod
    def from_file(cls, path: str | Path, create: bool = True) -> "Signer":
        """The secret in `path` (its bytes, surrounding whitespace ignored); made (random, owner
        read only) when it does not exist and `create` allows it: every process that shares the
        data directory then finds the same one."""
        path = Path(path)
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # O_EXCL: of processes starting together, one writes it, the others read it
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_urlsafe(SECRET_BYTES) + "\n")
        try:
            key = path.read_bytes().strip()
        except OSError as exc:
            raise SecretError(f"cannot read the stack secret {path}: {exc}") from None
        if not key and create:  # another process is writing it this very moment
            import time
            time.sleep(0.05)
            key = path.read_bytes().strip()
        return cls(key)

    def tag(self, purpose: str, *parts: str | bytes, size: int = 16) -> bytes:
        """HMAC-SHA256 over the purpose and the parts (length-prefixed, so parts cannot run into
        each other), cut to `size` bytes."""
        mac = hmac.new(self._key, purpose.encode(), hashlib.sha256)
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            mac.update(len(data).to_bytes(8, "big"))
            mac.update(data)
        return mac.digest()[:size]

    def token(self, purpose: str, *parts: str | bytes) -> str:
        """The tag as URL-safe text (22 characters): what a client is handed."""
        return base64.urlsafe_b64encode(self.tag(purpose, *parts)).rstrip(b"=").decode()

    def check_token(self, token: str, purpose: str, *parts: str | bytes) -> bool:
        return hmac.compare_digest(token.encode(), self.token(purpose, *parts).encode())

    def check_tag(self, tag: bytes, purpose: str, *parts: str | bytes) -> bool:
        return hmac.compare_digest(tag, self.tag(purpose, *parts, size=len(tag) or 16))

    def __repr__(self) -> str:  # never print the key
        return "Signer(key='***')"
