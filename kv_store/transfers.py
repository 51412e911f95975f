"""Reading the per-request transfer records the connector writes inside the engine."""

from __future__ import annotations

import redis.asyncio as aioredis
import structlog

from kv_store.keys import transfer_stats_key
from kv_store.records import TransferRecord, record_from_hash

log = structlog.get_logger("grokstack.kv_store")


class TransferRecords:
    def __init__(self, url: str, key_prefix: str) -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        self._key_prefix = key_prefix

    async def ping(self) -> None:
        await self._redis.ping()

    async def read(self, request_id: str) -> TransferRecord:
        """The request's transfers so far; an empty record when there is none or it is unreadable."""
        try:
            raw = await self._redis.hgetall(transfer_stats_key(self._key_prefix, request_id))
            return record_from_hash(raw)
        except Exception as exc:  # accounting must never fail a request
            log.warning("kv transfer record unreadable", error=str(exc))
            return TransferRecord()

    async def close(self) -> None:
        await self._redis.aclose()
