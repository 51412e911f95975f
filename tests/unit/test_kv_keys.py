import uuid

from bus.messages import KvHandle
from bus.signing import Signer
from kv_store.block_store import BlockStore
from kv_store.config import KvConfig
from kv_store.keys import (block_hashes, hash_of, layout_fingerprint, loadable_keys, model_identity, partial_block_key,
                           partial_candidates, prompt_block_keys)


def test_keys_of_a_shared_prefix_are_shared():
    a = list(range(100))
    b = list(range(64)) + [999] * 36
    ka, kb = block_hashes("L", a, 32, 3), block_hashes("L", b, 32, 3)
    assert ka[:2] == kb[:2] and ka[2] != kb[2]


def test_keys_chain_so_a_block_means_its_whole_prefix():
    a = [1] * 32 + [2] * 32
    b = [3] * 32 + [2] * 32
    assert block_hashes("L", a, 32, 2)[1] != block_hashes("L", b, 32, 2)[1]


def test_layout_and_model_are_part_of_every_key():
    tokens = list(range(64))
    assert block_hashes("L1", tokens, 32, 2) != block_hashes("L2", tokens, 32, 2)
    f1 = layout_fingerprint("m", "float32", 32, 3, 64, ["l0", "l1"])
    assert f1 == layout_fingerprint("m", "float32", 32, 3, 64, ["l1", "l0"])
    assert f1 != layout_fingerprint("m", "bfloat16", 32, 3, 64, ["l0", "l1"])
    assert f1 != layout_fingerprint("other", "float32", 32, 3, 64, ["l0", "l1"])


def test_prompt_block_keys_cover_only_full_blocks():
    keys = prompt_block_keys("p", "L", list(range(70)), 32, 70 // 32)
    assert len(keys) == 2 and all(k.startswith("p:blk:L:") for k in keys)


def test_a_partial_block_is_keyed_by_its_whole_prefix_and_its_length():
    tokens = list(range(100))
    key = partial_block_key("p", "L", tokens[:72], 32, "t")  # 2 full blocks and 8 tokens
    assert key.startswith("p:blk:L:") and key not in prompt_block_keys("p", "L", tokens, 32, 3, "t")
    assert key == partial_block_key("p", "L", list(range(72)), 32, "t")
    assert key != partial_block_key("p", "L", tokens[:80], 32, "t")  # another length
    assert key != partial_block_key("p", "L", tokens[:72], 32, "u")  # another tenant
    assert key != partial_block_key("p", "L", [7] + tokens[1:72], 32, "t")  # another prefix
    assert partial_block_key("p", "L", tokens[:8], 32, "t") != partial_block_key("p", "L", tokens[:8], 32, "")
    # a caller holding the chain (a connector's block keys) passes its last hash instead
    full = prompt_block_keys("p", "L", tokens, 32, 2, "t")
    assert partial_block_key("p", "L", tokens[:72], 32, "t", hash_of(full[-1])) == key
    assert partial_block_key("p", "L", tokens[:8], 32, "t", "") == partial_block_key("p", "L", tokens[:8], 32, "t")


def test_partial_candidates_are_the_saved_lengths_that_leave_a_token_to_compute():
    prompt = list(range(90))  # 2 full blocks, 26 tokens after them
    cands = partial_candidates("p", "L", 32, prompt, "t", 2, 8)
    assert [n for _, n in cands] == [24, 16, 8]  # longest first
    assert cands[0][0] == partial_block_key("p", "L", prompt[:88], 32, "t")
    assert [n for _, n in partial_candidates("p", "L", 32, prompt[:89], "t", 2, 8)] == [24, 16, 8]
    assert [n for _, n in partial_candidates("p", "L", 32, prompt[:88], "t", 2, 8)] == [16, 8]  # 1 left
    assert [n for _, n in partial_candidates("p", "L", 32, list(range(96)), "t", 2, 8)] == [24, 16, 8]
    assert partial_candidates("p", "L", 32, prompt, "t", 2, 0) == []  # partial blocks off
    assert partial_candidates("p", "L", 32, prompt[:70], "t", 2, 8) == []  # 6 tokens: none saved
    parent = hash_of(prompt_block_keys("p", "L", prompt, 32, 2, "t")[-1])
    assert partial_candidates("p", "L", 32, prompt, "t", 2, 8, parent) == cands


def test_model_identity_changes_with_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    first = model_identity(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert model_identity(str(tmp_path)) != first
    assert model_identity("org/name") == model_identity("org/name")


def handle_of(keys: list[str], layout: str = "L", block_size: int = 32) -> KvHandle:
    return KvHandle(model_id="m", layout=layout, block_size=block_size, keys=keys,
                    num_tokens=len(keys) * block_size, content_hash=keys[-1])


def test_a_request_may_load_its_own_full_blocks_but_never_the_last_token():
    keys, own, reason = loadable_keys("p", "L", 32, list(range(96)), "t")
    assert len(keys) == 3 and own == keys[:2] and reason == ""  # 96 tokens: block 3 holds the last one
    keys, own, _ = loadable_keys("p", "L", 32, list(range(97)), "t")
    assert own == keys == prompt_block_keys("p", "L", list(range(97)), 32, 3, "t")


def test_a_handle_must_name_the_requests_own_keys_and_past_it_the_request_loads_its_own():
    tokens = list(range(100))
    keys, own, _ = loadable_keys("p", "L", 32, tokens, "gold")
    # a migrated decode job: the handle names the prompt's blocks, the generated ones follow
    assert loadable_keys("p", "L", 32, tokens, "gold", handle_of(keys[:2]))[1:] == (own, "")
    assert loadable_keys("p", "L", 32, tokens, "gold", handle_of(keys))[1:] == (own, "")
    other = prompt_block_keys("p", "L", [7] * 100, 32, 3, "gold")
    assert loadable_keys("p", "L", 32, tokens, "gold", handle_of(other))[1:] == (
        [], "handle keys do not match the request's tokens")
    assert loadable_keys("p", "L", 32, tokens, "gold", handle_of(keys, layout="L2"))[1:] == (
        [], "handle was written by an engine with another KV layout")
    assert loadable_keys("p", "L", 32, tokens, "gold", handle_of(keys, block_size=16))[1] == []


def test_one_tenants_blocks_in_redis_are_invisible_to_another(redis_url):
    """The connector's own decision (keys.loadable_keys, then BlockStore.present_prefix, as
    connector._plan makes it) against the real Redis server: blocks saved for tenant gold are
    found for gold, and for bulk neither by its own keys nor through a handle naming gold's."""
    prefix = f"{KvConfig().kv_key_prefix}:{uuid.uuid4().hex[:10]}"
    store = BlockStore(redis_url, 60, Signer(b"s" * 32))
    tokens = list(range(200, 300))
    gold_keys, gold_own, _ = loadable_keys(prefix, "L", 32, tokens, "gold")
    store.save([(k, b"kv" * 64) for k in gold_keys])
    assert store.present_prefix(gold_own) == len(gold_own) == 3

    bulk_keys, bulk_own, _ = loadable_keys(prefix, "L", 32, tokens, "bulk")
    assert not set(bulk_keys) & set(gold_keys)
    assert store.present_prefix(bulk_own) == 0
    _, forged, reason = loadable_keys(prefix, "L", 32, tokens, "bulk", handle_of(gold_keys))
    assert forged == [] and store.present_prefix(forged) == 0 and reason
    _, unnamed, _ = loadable_keys(prefix, "L", 32, tokens, "", handle_of(gold_keys))  # a job without a tenant
    assert unnamed == []


def test_a_reader_finds_the_longest_partial_block_a_saver_left(redis_url):
    """As connector._plan looks: every full block present, then the longest saved partial block."""
    prefix = f"{KvConfig().kv_key_prefix}:{uuid.uuid4().hex[:10]}"
    store = BlockStore(redis_url, 60, Signer(b"s" * 32))
    answer = list(range(500, 590))  # a prompt and the answer tokens generated so far: 2 blocks and 26
    store.save([(partial_block_key(prefix, "L", answer[:80], 32, "t"), b"kv")])  # saved at 16 of block 3
    cands = partial_candidates(prefix, "L", 32, answer, "t", 2, 8)
    assert store.first_present([k for k, _ in cands]) == 1 and cands[1][1] == 16
    assert store.first_present([k for k, _ in partial_candidates(prefix, "L", 32, answer, "u", 2, 8)]) is None
    assert store.present_prefix([k for k, _ in cands]) == 0 and store.first_present([]) is None
