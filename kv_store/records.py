"""What the KV store writes and the workers read, as typed records.

Three records cross from the KV connector (inside vLLM's engine processes) to the workers:
- `KvRequest`: what a request tells the connector (its id, its tenant's namespace and, on the
  decode path, the prompt's KV handle);
- `KvReport`: what the connector tells about a finished request (tokens loaded, why not more,
  and the handle of the blocks it saved);
- `TransferRecord`: the bytes and milliseconds the connector moved for a request, kept in Redis.

vLLM carries the first two between its processes as plain dicts (`kv_transfer_params`, which
it serializes itself), and Redis keeps the third as a hash. The conversions at those
boundaries are the pure functions below, and nowhere else.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import msgspec

from bus.messages import KvHandle

TransferKind = Literal["save", "load"]


class KvRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a request tells the KV connector (vLLM's `kv_transfer_params` on the way in)."""
    request_id: str  # the stack's request id: the connector records its transfers under it
    namespace: str  # the tenant's KV namespace (kv_store/keys.py), "" for jobs without a tenant
    handle: KvHandle | None = None  # decode: only these blocks may be loaded


class KvReport(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the connector reports when a request finishes (`kv_transfer_params` on the way out)."""
    loaded_tokens: int  # prompt tokens loaded from Redis instead of computed
    load_reason: str  # why not more were loadable ("" when nothing was missing)
    handle: KvHandle | None = None  # the prompt's blocks this engine saved (producers only)


class TransferStats(msgspec.Struct):
    """Blocks moved one way, in one transfer or summed over a request's transfers."""
    blocks: int = 0
    bytes: int = 0
    ms: float = 0.0
    failed: int = 0  # blocks that could not be saved or loaded


class TransferRecord(msgspec.Struct, frozen=True):
    """A request's KV transfers, summed over the engine steps that moved its blocks."""
    save: TransferStats = msgspec.field(default_factory=TransferStats)
    load: TransferStats = msgspec.field(default_factory=TransferStats)


def request_to_params(request: KvRequest) -> dict[str, Any]:
    """The dict vLLM carries to the connector: {"request_id", "namespace"[, "handle": {...}]}."""
    return msgspec.to_builtins(request)


def request_from_params(params: Mapping[str, Any] | None, engine_request_id: str) -> KvRequest:
    """The request's KvRequest, from the dict vLLM hands the connector. A request that carried
    none (an engine driven directly, not by a worker) goes by vLLM's id, in no namespace.
    Only `request_to_params` writes these dicts, so one that does not convert is a bug: it raises."""
    if not params:
        return KvRequest(request_id=engine_request_id, namespace="")
    return msgspec.convert(params, KvRequest)


def report_to_params(report: KvReport) -> dict[str, Any]:
    """The dict the connector returns to vLLM: {"loaded_tokens", "load_reason"[, "handle": {...}]}."""
    return msgspec.to_builtins(report)


def report_from_params(params: Mapping[str, Any] | None) -> KvReport | None:
    """The connector's report, from the dict vLLM hands back with the last output; None when
    the engine has no connector (or it did not see the request)."""
    return msgspec.convert(params, KvReport) if params else None


def record_from_hash(fields: Mapping[bytes, bytes]) -> TransferRecord:
    """The record from the Redis hash `BlockStore.record` adds to: one field per kind and
    counter (b"save_bytes": b"4096", b"load_ms": b"1.25", ...); a missing field counts 0.

    Raises msgspec.ValidationError when a counter is not a number."""
    sides: dict[str, dict[str, str]] = {}
    for name, value in fields.items():
        kind, _, counter = name.decode().partition("_")
        sides.setdefault(kind, {})[counter] = value.decode()
    # Redis returns numbers as text: lax conversion reads them as the fields' int and float.
    return msgspec.convert(sides, TransferRecord, strict=False)
