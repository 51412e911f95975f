"""Content addresses for KV blocks: pure functions, shared by the connector and the workers.

Block i of a prompt is keyed by a chained hash of (layout, namespace, tokens of blocks 0..i).
Two prompts that share a prefix therefore share the keys of its full blocks, which is what lets
the second turn of a conversation find the first turn's KV, on any worker. The namespace is the
tenant: two tenants never share a key, so one tenant's request can never be served (or time)
another's KV, even for the same tokens.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import Sequence

from bus.messages import KvHandle
from kv_store.records import KvRequest


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def model_identity(model_path: str) -> str:
    """A short id of the weights: KV computed by other weights must never be reused.

    A local HF folder is identified by its config and the names and sizes of its weight files
    (cheap, and changes whenever the weights do); a hub name stands for itself.
    """
    folder = Path(model_path)
    if not folder.is_dir():
        return _digest(model_path.encode()).hex()[:16]
    parts = [(folder / "config.json").read_bytes() if (folder / "config.json").exists() else b""]
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        parts.append(f"{f.name}:{f.stat().st_size}".encode())
    return _digest(b"\0".join(parts)).hex()[:16]


def layout_fingerprint(model: str, dtype: str, block_size: int, num_kv_heads: int,
                       head_size: int, layer_names: Sequence[str]) -> str:
    """Everything that must match for stored block bytes to mean the same thing to a reader."""
    spec = json.dumps([model, dtype, block_size, num_kv_heads, head_size, sorted(layer_names)])
    return _digest(spec.encode()).hex()[:16]


def kv_namespace(tenant: str | None) -> str:
    """The KV namespace of a request's tenant ("" for jobs published straight to the bus)."""
    return tenant or ""


def kv_request(request_id: str, tenant: str | None, handle: KvHandle | None = None) -> KvRequest:
    """What a request tells the KV connector: its id (for transfer records), its tenant's
    namespace and, on the decode path, the handle of the prompt's blocks."""
    return KvRequest(request_id=request_id, namespace=kv_namespace(tenant), handle=handle)


def _chain_root(layout: str, namespace: str) -> bytes:
    return _digest(layout.encode() + (b"\0" + namespace.encode() if namespace else b""))


def block_hashes(layout: str, token_ids: Sequence[int], block_size: int, num_blocks: int,
                 namespace: str = "") -> list[str]:
    """Chained hashes of the first `num_blocks` full blocks of `token_ids`."""
    tokens = array("i", token_ids[: num_blocks * block_size])
    running = _chain_root(layout, namespace)
    out = []
    for i in range(num_blocks):
        running = _digest(running + tokens[i * block_size:(i + 1) * block_size].tobytes())
        out.append(running.hex())
    return out


def block_key(key_prefix: str, layout: str, block_hash: str) -> str:
    return f"{key_prefix}:blk:{layout}:{block_hash}"


def hash_of(key: str) -> str:
    """The chained hash a block's key ends with (block_key's last part)."""
    return key.rsplit(":", 1)[-1]


def prompt_block_keys(key_prefix: str, layout: str, token_ids: Sequence[int], block_size: int,
                      num_blocks: int, namespace: str = "") -> list[str]:
    return [block_key(key_prefix, layout, h)
            for h in block_hashes(layout, token_ids, block_size, num_blocks, namespace)]


def partial_block_key(key_prefix: str, layout: str, token_ids: Sequence[int], block_size: int,
                      namespace: str = "", parent: str | None = None) -> str:
    """The key of a block's first tokens: the tokens of `token_ids` past its last full block
    (1 to block_size - 1 of them), chained on the full blocks before them like a full block, and
    marked partial, so no full block and no partial block of another length shares it.

    `parent`: the last full block's hash ("" when there is none), when the caller has it (a
    connector holds its request's block keys); else it is computed from `token_ids` again."""
    full = len(token_ids) // block_size
    assert 0 < len(token_ids) - full * block_size < block_size, "a partial block holds 1 to block_size - 1 tokens"
    if parent is None:
        parent = (block_hashes(layout, token_ids, block_size, full, namespace) or [""])[-1]
    running = bytes.fromhex(parent) if parent else _chain_root(layout, namespace)
    tail = array("i", token_ids[full * block_size:])
    return block_key(key_prefix, layout, _digest(running + b"partial" + tail.tobytes()).hex())


def partial_candidates(key_prefix: str, layout: str, block_size: int, prompt: Sequence[int], namespace: str,
                       full_blocks: int, step: int, parent: str | None = None) -> list[tuple[str, int]]:
    """(key, tokens) of the partial blocks that may follow a prompt's first `full_blocks` loaded
    blocks, longest first: those a saver writes every `step` tokens of a block (connector.py),
    leaving at least one prompt token to compute (to sample from). `parent` as in
    partial_block_key: the hash of block `full_blocks - 1`, when the caller has it."""
    if step <= 0:
        return []
    start = full_blocks * block_size
    room = min(len(prompt) - 1 - start, block_size - 1)
    if room < step:
        return []
    if parent is None:  # one chain for every candidate
        parent = (block_hashes(layout, prompt, block_size, full_blocks, namespace) or [""])[-1]
    return [(partial_block_key(key_prefix, layout, prompt[: start + n], block_size, namespace, parent), n)
            for n in range(room // step * step, 0, -step)]


def loadable_keys(key_prefix: str, layout: str, block_size: int, prompt: Sequence[int],
                  namespace: str, handle: KvHandle | None = None) -> tuple[list[str], list[str], str]:
    """What a request may load: (the keys of every full block of its prompt, the keys it may
    load from block 0, why not more ("" when nothing stands in the way)).

    The keys are derived here, from the request's own tokens and tenant, never taken from a
    job: a handle (the decode path) is used only when it was written with this layout and
    names the request's own keys from the first. So another tenant's handle, or a handle for
    other tokens, loads nothing. Past the handle's blocks the request's own keys stay loadable:
    a migrated decode job's prompt goes on with the tokens already generated, whose blocks the
    worker that generated them saved. At least one prompt token must be computed to sample
    from, so the last block of a prompt that ends on a block boundary is never loaded."""
    keys = prompt_block_keys(key_prefix, layout, prompt, block_size, len(prompt) // block_size, namespace)
    own = keys[: min(len(keys), max(0, len(prompt) - 1) // block_size)]
    if handle is None:
        return keys, own, ""
    if handle.layout != layout or handle.block_size != block_size:
        return keys, [], "handle was written by an engine with another KV layout"
    named = list(handle.keys)[: len(own)]
    if named != own[: len(named)]:
        return keys, [], "handle keys do not match the request's tokens"
    return keys, own, ""


def transfer_stats_key(key_prefix: str, request_id: str) -> str:
    """Per-request record of KV bytes and milliseconds moved, written by the connector."""
    return f"{key_prefix}:xfer:{request_id}"
