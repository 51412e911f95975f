"""The worker pools, as one table: for each worker role, the service that turns its jobs into
events and the shape of its engine. What a role pulls and may publish is the bus's table
(bus/roles.py, bus/topology.py); this one is what it runs.

Services are named by qualname and imported when a worker starts, so adding a pool is a row
here and a service class, not another `if role == ...`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from bus.roles import Role

KvRole = Literal["kv_both", "kv_consumer"]


@dataclass(frozen=True)
class Pool:
    name: str
    service: str  # qualname of the Service class (inference/worker.py's protocol)
    # The KV connector's role in the engine (kv_store/connector.py): kv_both loads a
    # conversation's earlier blocks and saves the new ones (prompt and answer); kv_consumer only
    # loads; None: no connector (a plain engine).
    kv_role: KvRole | None
    speculates: bool  # the engine decodes many tokens per request: speculation may pay
    slots_field: Literal["prefill_slots", "decode_slots"]  # the EngineConfig field that sizes its batch
    role: Role | None = None  # its bus role; None: an engine outside the stack

    def service_class(self) -> Any:
        module, _, name = self.service.rpartition(".")
        return getattr(importlib.import_module(module), name)


POOLS: dict[Role, Pool] = {pool.role: pool for pool in (  # type: ignore[misc]
    Pool("prefill", "inference.prefill.PrefillService", "kv_both", False, "prefill_slots", Role.PREFILL),
    Pool("decode", "inference.decode.DecodeService", "kv_both", True, "decode_slots", Role.DECODE),
    Pool("aggregated", "inference.aggregated.AggregatedService", "kv_both", True, "decode_slots",
         Role.AGGREGATED),
)}

# One plain engine, no bus, no KV connector, no speculation: what running vLLM alone gives (the
# tests' reference answers, the bench's direct phase, calibration).
DIRECT = Pool("direct", "", None, False, "decode_slots")


def pool_named(name: str) -> Pool:
    """The pool of a worker role, or DIRECT for "direct"."""
    found = {pool.name: pool for pool in (*POOLS.values(), DIRECT)}.get(str(name))
    if found is None:
        raise ValueError(f"no engine pool {name!r}: one of {', '.join(p.name for p in (*POOLS.values(), DIRECT))}")
    return found
