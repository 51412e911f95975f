from kv_store.keys import block_hashes, layout_fingerprint, model_identity, prompt_block_keys


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


def test_model_identity_changes_with_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    first = model_identity(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert model_identity(str(tmp_path)) != first
    assert model_identity("org/name") == model_identity("org/name")
