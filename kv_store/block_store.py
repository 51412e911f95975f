"""Synchronous Redis access for KV blocks, used inside the engine processes.

Failures never raise into the engine: a lookup that fails finds nothing, a load that fails
reports the blocks it could not fill (vLLM then recomputes them), a save that fails is logged.

Every block is stored sealed: `tag || payload`, the tag an HMAC of the block's key and payload
with the stack secret (`bus/signing.py`, purpose "kv-block"). A load checks the tag before the
bytes are used; a block whose tag does not match (planted or corrupted in Redis, written with
another secret, or copied under another key, e.g. another tenant's) is treated exactly as a
missing block: a miss, recomputed by vLLM, and logged as "kv block failed its integrity check".
"""

from __future__ import annotations

import logging
import time

import redis

from bus.signing import Signer
from kv_store.records import TransferKind, TransferStats

log = logging.getLogger("grokstack.kv_store")

TAG_PURPOSE = "kv-block"
TAG_BYTES = 16


def seal(signer: Signer, key: str, payload: bytes) -> bytes:
    """The value stored for block `key`: its tag, then its payload."""
    return signer.tag(TAG_PURPOSE, key, payload, size=TAG_BYTES) + payload


def unseal(signer: Signer, key: str, blob: bytes) -> memoryview | None:
    """The payload of a stored value (a view into it, read-only: a block's megabytes are copied
    once, into the engine's cache), or None when its tag is not the one `seal` gave it."""
    if len(blob) < TAG_BYTES:
        return None
    payload = memoryview(blob)[TAG_BYTES:]
    if not signer.check_tag(blob[:TAG_BYTES], TAG_PURPOSE, key, payload):
        return None
    return payload


class BlockStore:
    """`signer` seals what `save` writes and opens what `load` reads. A store without one (the
    fake engine's, which only ever asks whether blocks exist) writes bare payloads and cannot load."""

    def __init__(self, url: str, ttl_s: int, signer: Signer | None = None) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=3)
        self._ttl_s = ttl_s
        self._signer = signer
        self.rejected = 0  # blocks that failed their integrity check, since start

    def _exist(self, keys: list[str]) -> list[bool]:
        """Whether each of `keys` exists right now (none does when the lookup fails)."""
        if not keys:
            return []
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [bool(hit) for hit in pipe.execute()]
        except redis.RedisError as exc:
            log.warning("kv lookup failed, treating as a miss: %s", exc)
            return [False] * len(keys)

    def present_prefix(self, keys: list[str]) -> int:
        """How many of `keys`, from the first, exist right now (their tags are checked on load)."""
        found = self._exist(keys)
        return next((i for i, hit in enumerate(found) if not hit), len(found))

    def first_present(self, keys: list[str]) -> int | None:
        """The index of the first of `keys` that exists right now, None when none does."""
        return next((i for i, hit in enumerate(self._exist(keys)) if hit), None)

    def load(self, keys: list[str]) -> tuple[list[memoryview | None], TransferStats]:
        """The payloads of `keys` (None where missing or failing the integrity check), refreshing
        their TTL as they are read. Stats count the stored bytes of the good blocks."""
        if self._signer is None:
            raise RuntimeError("this BlockStore has no signer: it cannot check, so cannot load, blocks")
        t0 = time.perf_counter()
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.getex(key, ex=self._ttl_s)
            blobs = pipe.execute()
        except redis.RedisError as exc:
            log.warning("kv load of %d blocks failed: %s", len(keys), exc)
            blobs = [None] * len(keys)
        payloads: list[memoryview | None] = []
        stored = 0
        for key, blob in zip(keys, blobs, strict=True):
            payload = unseal(self._signer, key, blob) if blob is not None else None
            if blob is not None and payload is None:
                self.rejected += 1
                log.warning("kv block failed its integrity check, treating it as missing: %s "
                            "(%d bytes; %d rejected since start)", key, len(blob), self.rejected)
            elif payload is not None:
                stored += len(blob)
            payloads.append(payload)
        good = sum(1 for p in payloads if p is not None)
        return payloads, TransferStats(good, stored, (time.perf_counter() - t0) * 1000, len(keys) - good)

    def save(self, items: list[tuple[str, bytes]]) -> TransferStats:
        """Store each (key, payload), sealed when the store has a signer. Stats count stored bytes."""
        t0 = time.perf_counter()
        if self._signer is not None:
            items = [(key, seal(self._signer, key, payload)) for key, payload in items]
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key, blob in items:
                pipe.set(key, blob, ex=self._ttl_s)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("kv save of %d blocks failed: %s", len(items), exc)
            return TransferStats(failed=len(items), ms=(time.perf_counter() - t0) * 1000)
        return TransferStats(len(items), sum(len(b) for _, b in items), (time.perf_counter() - t0) * 1000)

    def record(self, stats_key: str, kind: TransferKind, stats: TransferStats) -> None:
        """Add `stats` to the request's transfer record: one hash field per counter, `<kind>_<counter>`
        (the worker that owns the request reads it back with `records.record_from_hash`)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hincrby(stats_key, f"{kind}_blocks", stats.blocks)
            pipe.hincrby(stats_key, f"{kind}_bytes", stats.bytes)
            pipe.hincrbyfloat(stats_key, f"{kind}_ms", stats.ms)
            pipe.hincrby(stats_key, f"{kind}_failed", stats.failed)
            pipe.expire(stats_key, 600)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("kv transfer record failed: %s", exc)
