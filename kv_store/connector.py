"""A vLLM v1 KV connector that keeps KV blocks in Redis, addressed by content.

Loaded by module path (`kv_connector_module_path="kv_store.connector"`). One instance runs on
the scheduler side (decides what to load and save, in the EngineCore process) and one per
worker (moves the bytes, in the model worker process).

- A request tells the connector who it is in its `kv_transfer_params` (a `KvRequest`, see
  `kv_store/records.py`), and a finished request's `kv_transfer_params` carry the connector's
  `KvReport` back; vLLM moves both between its processes as plain dicts.
- Producer roles (`kv_producer`, `kv_both`: every pool of the stack) save every full block of
  a request's tokens, prompt *and* answer, under `block_key(prefix, layout, chained hash of the
  tokens)`, as each block fills: the next turn of a conversation, whose prompt is this turn's
  prompt and answer, then loads all of it, and a decode job that moves to another worker loads
  the tokens it already generated. The handle reported when a request finishes names the
  prompt's blocks (what prefill hands decode). Blocks loaded from the store are not saved again.
- Besides full blocks, producers save the block being filled every `partial_step` tokens of it,
  under the key of its first tokens (`keys.partial_block_key`), and a consumer loads, after the
  run of full blocks it found, the longest such partial block its prompt allows: it recomputes
  fewer than `partial_step` tokens of that block instead of up to a whole block (in the first
  decode step of every request, in a migrated decode job, in a conversation's next turn). A
  partial block is moved whole, whatever the backend's layout inside a block: past its first
  tokens it holds what the saver had there, which the loader computes over before reading.
- Consumer roles (`kv_consumer`, `kv_both`) load the longest run of a prompt's full blocks that
  Redis holds. A request may carry a handle (the decode path): then only the handle's keys are
  used, and only if they match the request's own tokens, tenant and this engine's layout
  (`keys.loadable_keys`); anything else is recomputed.
- Every block is sealed with an integrity tag (the stack secret, whose file's path arrives in
  `kv_connector_extra_config["secret_file"]`) and checked before its bytes are used; a block
  that fails the check is a missing block (`kv_store/block_store.py`).
- Loads and saves are synchronous within the engine step. A block that cannot be loaded is
  reported to vLLM, which recomputes it (`kv_load_failure_policy="recompute"`).
- With `step_lock` set, engines sharing this machine's cores take turns per forward pass, and
  vLLM's processes wait for each other without spinning (`kv_store/step_lock.py`).

Block bytes: for each layer (in sorted name order) the block's slice of that layer's KV tensor,
concatenated; the layout fingerprint in every key guarantees reader and writer agree on it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from bus.messages import KvHandle
from bus.signing import Signer
from kv_store.block_store import BlockStore
from kv_store.keys import (hash_of, layout_fingerprint, loadable_keys, model_identity, partial_block_key,
                           partial_candidates, prompt_block_keys, transfer_stats_key)
from kv_store.records import KvReport, report_to_params, request_from_params
from kv_store.step_lock import StepLock, wait_without_spinning

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("grokstack.kv_store")
# A loaded block is read in place from Redis's reply (read-only) and never written through, so
# torch's warning that the buffer is not writable does not apply to this module's frombuffer.
warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning, module=__name__)


@dataclass
class BlockTransfer:
    """Blocks of one request to move in one step (scheduler -> worker, pickled)."""
    request_id: str  # the stack's request id, for the transfer record
    keys: list[str]
    block_ids: list[int]
    partial: bool = False  # one block of which only the first tokens (named by its key) are good


@dataclass
class RedisConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


@dataclass
class _LoadPlan:
    request_id: str  # the stack's request id
    keys: list[str]  # every full block of the prompt
    first_block: int  # blocks below this are already computed locally
    present: int  # blocks from 0 that are in Redis and may be loaded
    reason: str  # why not more was loadable, for logs and usage
    namespace: str  # the tenant's: the keys of the blocks its answer fills are in it too
    partial: tuple[str, int] | None = None  # (key, tokens) of the block after the full ones, if stored


@dataclass
class _SaveState:
    request_id: str  # the stack's request id
    namespace: str
    request: "Request"  # the scheduler's live request: its tokens grow as it decodes
    keys: list[str]  # keys of its full blocks, extended as answer tokens fill blocks
    saved: int  # blocks below this are in the store (loaded, or saved by an earlier step)
    block_ids: list[int] = field(default_factory=list)
    partial_saved: tuple[int, int] = (0, 0)  # (block, tokens) of the last partial block saved


def target_layers(layer_names: list[str]) -> list[str]:
    """The target model's attention layers. A draft model (speculative decoding) adds its own
    layers under `draft_model.`; they are not moved, so a decode engine with a draft model reads
    the same blocks a prefill engine without one wrote (the draft then proposes from a colder
    cache for that prefix; the target verifies every token, so the answer is unchanged)."""
    return [n for n in layer_names if not n.startswith("draft_model.")]


class RedisKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self._key_prefix: str = extra.get("key_prefix", "gskv")
        if not extra.get("secret_file"):
            raise ValueError("the KV connector needs the stack secret file to seal and check blocks: "
                             "kv_connector_extra_config['secret_file'] is not set (EngineSetup.secret_file, "
                             "from settings.bus.secret_file)")
        # The path, not the key, crosses into vLLM's config; the key is read here.
        self._store = BlockStore(extra["redis_url"], int(extra.get("ttl_s", 3600)),
                                 Signer.from_file(extra["secret_file"]))
        self._model_id: str = extra.get("model_id") or vllm_config.model_config.model
        self._block_size = vllm_config.cache_config.block_size
        self._partial_step = int(extra.get("partial_step", 0))
        self._can_save = self._kv_transfer_config.is_kv_producer
        self._can_load = self._kv_transfer_config.is_kv_consumer
        group = kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        self._layer_names = target_layers(group.layer_names)
        self._layout = layout_fingerprint(
            model_identity(vllm_config.model_config.model), str(spec.dtype), spec.block_size,
            spec.num_kv_heads, spec.head_size, self._layer_names)
        # scheduler side
        self._plans: dict[str, _LoadPlan] = {}
        self._requests: dict[str, "Request"] = {}  # by vLLM's id, from lookup until finished
        self._pending_loads: list[BlockTransfer] = []
        self._saving: dict[str, _SaveState] = {}
        # worker side
        self._layers: list[tuple[str, torch.Tensor]] = []
        self._block_dim = 0
        self._load_errors: set[int] = set()
        lock_path = extra.get("step_lock", "")
        self._step_lock = StepLock(lock_path) if lock_path and role == KVConnectorRole.WORKER else None
        if lock_path:
            wait_without_spinning()  # in this process: the scheduler's or the worker's

    # ------------------------------------------------------------------ scheduler side

    def _plan(self, request: "Request", num_computed_tokens: int) -> _LoadPlan:
        plan = self._plans.get(request.request_id)
        if plan is not None:
            return plan
        kv = request_from_params(request.kv_transfer_params, request.request_id)
        keys, candidates, reason = loadable_keys(self._key_prefix, self._layout, self._block_size,
                                                 list(request.prompt_token_ids or []), kv.namespace, kv.handle)
        present = self._store.present_prefix(candidates) if self._can_load else 0
        partial = None
        if self._can_load and not reason:  # the block after the run found may be stored in part
            tails = partial_candidates(self._key_prefix, self._layout, self._block_size,
                                       list(request.prompt_token_ids or []), kv.namespace, present, self._partial_step,
                                       parent=hash_of(keys[present - 1]) if present else "")
            found = self._store.first_present([key for key, _ in tails])
            partial = tails[found] if found is not None else None
        if present < len(candidates) and not reason:
            reason = f"{len(candidates) - present} of {len(candidates)} blocks missing from the store"
        plan = _LoadPlan(kv.request_id or request.request_id, keys, num_computed_tokens // self._block_size,
                         present, reason, kv.namespace, partial)
        self._plans[request.request_id] = plan
        self._requests[request.request_id] = request
        return plan

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        plan = self._plan(request, num_computed_tokens)
        matched = plan.present * self._block_size + (plan.partial[1] if plan.partial else 0)
        return max(0, matched - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        plan = self._plans[request.request_id]
        count = num_external_tokens // self._block_size
        ids = blocks.get_block_ids()[0]
        block_ids = ids[plan.first_block:plan.first_block + count]
        keys = plan.keys[plan.first_block:plan.first_block + count]
        self._pending_loads.append(BlockTransfer(plan.request_id, keys, list(block_ids)))
        if num_external_tokens % self._block_size and plan.partial:  # the partial block after them
            block_id = ids[plan.first_block + count]
            self._pending_loads.append(BlockTransfer(plan.request_id, [plan.partial[0]], [block_id], partial=True))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = RedisConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        if self._can_save:
            self._collect_saves(scheduler_output, meta)
        return meta

    def _collect_saves(self, out: "SchedulerOutput", meta: RedisConnectorMetadata) -> None:
        for new in out.scheduled_new_reqs:
            plan = self._plans.get(new.req_id)
            request = self._requests.get(new.req_id)
            if plan is None or request is None:
                continue
            # Blocks already computed when it is first scheduled were loaded from the store.
            loaded = new.num_computed_tokens
            state = _SaveState(plan.request_id, plan.namespace, request, list(plan.keys),
                               loaded // self._block_size, list(new.block_ids[0]),
                               (loaded // self._block_size, loaded % self._block_size))
            self._saving[new.req_id] = state
            self._add_save(state, new.num_computed_tokens, out.num_scheduled_tokens[new.req_id], meta)
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._saving.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids.extend(new_ids[0])
            self._add_save(state, cached.num_computed_tokens[i], out.num_scheduled_tokens[req_id], meta)

    def _add_save(self, state: _SaveState, computed: int, scheduled: int,
                  meta: RedisConnectorMetadata) -> None:
        """Save the blocks this step completes. The worker saves after the step's forward pass,
        so a block is complete once this step's tokens fill it, provided their ids are known and
        final: a speculative draft token is neither (it may be rejected), and the scheduler's
        `num_tokens` counts only accepted tokens, so the frontier stops before any draft."""
        # Computed tokens below what was saved: vLLM is computing blocks again (a load that
        # failed its check, or a preempted request): save them again, over the bad or lost ones.
        state.saved = min(state.saved, computed // self._block_size)
        frontier = min(computed + scheduled, state.request.num_tokens)
        end = min(frontier // self._block_size, len(state.block_ids))
        if end > state.saved:
            if end > len(state.keys):  # answer tokens filled new blocks: their keys chain on the prompt's
                state.keys = prompt_block_keys(self._key_prefix, self._layout, state.request.all_token_ids,
                                               self._block_size, end, state.namespace)
            meta.saves.append(BlockTransfer(state.request_id, state.keys[state.saved:end],
                                            state.block_ids[state.saved:end]))
            state.saved = end
        self._add_partial_save(state, frontier, meta)

    def _add_partial_save(self, state: _SaveState, frontier: int, meta: RedisConnectorMetadata) -> None:
        """Save the first tokens of the block being filled, each time `partial_step` more of them
        are computed (a full block is saved whole, above)."""
        if self._partial_step <= 0:
            return
        block = frontier // self._block_size
        tokens = frontier % self._block_size // self._partial_step * self._partial_step
        if not tokens or block >= len(state.block_ids) or (block, tokens) <= state.partial_saved:
            return
        parent = None if block > len(state.keys) else hash_of(state.keys[block - 1]) if block else ""
        key = partial_block_key(self._key_prefix, self._layout, state.request.all_token_ids[:block * self._block_size
                                                                                              + tokens],
                                self._block_size, state.namespace, parent)
        meta.saves.append(BlockTransfer(state.request_id, [key], [state.block_ids[block]], partial=True))
        state.partial_saved = (block, tokens)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        plan = self._plans.pop(request.request_id, None)
        self._saving.pop(request.request_id, None)
        self._requests.pop(request.request_id, None)
        if plan is None:
            return False, None
        handle = None
        if self._can_save and plan.keys:
            handle = KvHandle(model_id=self._model_id, layout=self._layout, block_size=self._block_size,
                              keys=plan.keys, num_tokens=len(plan.keys) * self._block_size,
                              content_hash=plan.keys[-1].rsplit(":", 1)[-1])
        partial = plan.partial[1] if plan.partial and plan.present >= plan.first_block else 0
        report = KvReport(loaded_tokens=max(0, plan.present - plan.first_block) * self._block_size + partial,
                          load_reason=plan.reason, handle=handle)
        return False, report_to_params(report)

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = set(self._layer_names)
        self._layers = sorted((n, t) for n, t in kv_caches.items() if n in names)
        num_blocks = self._kv_cache_config.num_blocks
        first = self._layers[0][1]
        # CPU and most backends keep blocks on dim 0; FlashAttention's (2, blocks, ...) on dim 1.
        self._block_dim = 0 if first.shape[0] == num_blocks else 1

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        if self._step_lock is not None:
            self._step_lock.acquire()  # released after the pass, in clear_connector_metadata
        super().bind_connector_metadata(connector_metadata)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self._step_lock is not None:
            self._step_lock.release()

    def _block(self, tensor: torch.Tensor, block_id: int) -> torch.Tensor:
        return tensor[block_id] if self._block_dim == 0 else tensor[:, block_id]

    def _block_bytes(self) -> int:
        t = self._block(self._layers[0][1], 0)
        return t.numel() * t.element_size() * len(self._layers)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RedisConnectorMetadata)
        broken: set[str] = set()  # requests with a full block that failed: their partial one is of no use
        for transfer in meta.loads:
            if transfer.partial and transfer.request_id in broken:
                self._load_errors.update(transfer.block_ids)
                continue
            blobs, stats = self._store.load(transfer.keys)
            expected = self._block_bytes()
            for blob, block_id in zip(blobs, transfer.block_ids, strict=True):
                if blob is None or len(blob) != expected:
                    self._load_errors.add(block_id)
                    continue
                self._write_block(block_id, blob)
            stats.failed = len(transfer.block_ids) - sum(
                1 for b in blobs if b is not None and len(b) == expected)
            if stats.failed:
                broken.add(transfer.request_id)
            self._store.record(transfer_stats_key(self._key_prefix, transfer.request_id), "load", stats)

    def _write_block(self, block_id: int, blob: memoryview) -> None:
        first = self._block(self._layers[0][1], block_id)
        per_layer = torch.frombuffer(blob, dtype=torch.uint8).view(first.dtype).view(
            len(self._layers), *first.shape)
        for i, (_, tensor) in enumerate(self._layers):
            self._block(tensor, block_id).copy_(per_layer[i], non_blocking=False)

    def _read_block(self, block_id: int) -> bytes:
        stacked = torch.stack([self._block(t, block_id) for _, t in self._layers])
        return stacked.contiguous().view(torch.uint8).cpu().numpy().tobytes()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete inside start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        return  # whole blocks are saved once every layer is written, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RedisConnectorMetadata)
        for transfer in meta.saves:
            items = [(k, self._read_block(b)) for k, b in zip(transfer.keys, transfer.block_ids, strict=True)]
            stats = self._store.save(items)
            self._store.record(transfer_stats_key(self._key_prefix, transfer.request_id), "save", stats)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
