"""Synchronous Redis access for KV blocks, used inside the engine processes.

Failures never raise into the engine: a lookup that fails finds nothing, a load that fails
reports the blocks it could not fill (vLLM then recomputes them), a save that fails is logged.
"""

from __future__ import annotations

import logging
import time

import redis

from kv_store.records import TransferKind, TransferStats

log = logging.getLogger("grokstack.kv_store")


class BlockStore:
    def __init__(self, url: str, ttl_s: int) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=3)
        self._ttl_s = ttl_s

    def present_prefix(self, keys: list[str]) -> int:
        """How many of `keys`, from the first, exist right now."""
        if not keys:
            return 0
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            found = pipe.execute()
        except redis.RedisError as exc:
            log.warning("kv lookup failed, treating as a miss: %s", exc)
            return 0
        n = 0
        while n < len(found) and found[n]:
            n += 1
        return n

    def load(self, keys: list[str]) -> tuple[list[bytes | None], TransferStats]:
        """The blobs of `keys` (None where missing), refreshing their TTL as they are read."""
        t0 = time.perf_counter()
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.getex(key, ex=self._ttl_s)
            blobs = pipe.execute()
        except redis.RedisError as exc:
            log.warning("kv load of %d blocks failed: %s", len(keys), exc)
            blobs = [None] * len(keys)
        got = [b for b in blobs if b is not None]
        return blobs, TransferStats(len(got), sum(len(b) for b in got),
                                    (time.perf_counter() - t0) * 1000, len(keys) - len(got))

    def save(self, items: list[tuple[str, bytes]]) -> TransferStats:
        t0 = time.perf_counter()
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
