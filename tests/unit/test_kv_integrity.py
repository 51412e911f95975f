"""Every KV block in Redis carries an integrity tag, checked before its bytes are used: the real
BlockStore against the suite's real Redis-compatible server (tests/conftest.py). A block that
fails the check loads exactly as a missing one."""

from __future__ import annotations

import logging
import os
import uuid

import pytest
import redis

from bus.signing import Signer
from kv_store.block_store import TAG_BYTES, BlockStore, seal, unseal
from kv_store.config import KvConfig

SIGNER = Signer(b"k" * 32)
# A block of the bundled model on the CPU profile: 30 layers x K,V x 32 tokens x 3 heads x 64 x fp32.
BLOCK_BYTES = 30 * 2 * 32 * 3 * 64 * 4


def fresh_keys(n: int) -> list[str]:
    """Keys under the stack's default prefix (what the embedded server's user may touch), unique
    to this test."""
    run = uuid.uuid4().hex[:10]
    return [f"{KvConfig().kv_key_prefix}:{run}:blk:L:{i:02d}" for i in range(n)]


@pytest.fixture
def store(redis_url: str) -> BlockStore:
    return BlockStore(redis_url, 60, SIGNER)


@pytest.fixture
def raw(redis_server):
    """Someone with write access to Redis, tampering (the server's operator login)."""
    with redis.Redis.from_url(redis_server.ops_url) as client:
        yield client


def test_a_sealed_block_loads_as_it_was_saved(store):
    keys = fresh_keys(2)
    payloads = [os.urandom(BLOCK_BYTES), os.urandom(BLOCK_BYTES)]
    saved = store.save(list(zip(keys, payloads, strict=True)))
    loaded, stats = store.load(keys)
    assert loaded == payloads
    assert (stats.blocks, stats.failed) == (2, 0)
    assert stats.bytes == saved.bytes == 2 * (BLOCK_BYTES + TAG_BYTES)


def test_a_flipped_payload_byte_is_a_miss_and_is_logged(store, raw, caplog):
    keys = fresh_keys(3)
    store.save([(k, os.urandom(BLOCK_BYTES)) for k in keys])
    blob = bytearray(raw.get(keys[1]))
    blob[TAG_BYTES + BLOCK_BYTES // 2] ^= 0x01  # one bit of the payload; the tag kept
    raw.set(keys[1], bytes(blob))
    with caplog.at_level(logging.WARNING, logger="grokstack.kv_store"):
        loaded, stats = store.load(keys)
    assert loaded[0] is not None and loaded[1] is None and loaded[2] is not None
    assert (stats.blocks, stats.failed, store.rejected) == (2, 1, 1)
    assert stats.bytes == 2 * (BLOCK_BYTES + TAG_BYTES)  # only what was used counts as read
    assert "kv block failed its integrity check" in caplog.text and keys[1] in caplog.text


def test_a_flipped_tag_byte_is_a_miss(store, raw):
    [key] = fresh_keys(1)
    store.save([(key, b"x" * 1000)])
    blob = bytearray(raw.get(key))
    blob[0] ^= 0x80
    raw.set(key, bytes(blob))
    assert store.load([key])[0] == [None]


def test_a_valid_block_copied_under_another_key_is_a_miss(store, raw):
    """The key is inside the tag: a block cannot be moved to another prompt's (or another
    tenant's) address, even with its tag intact."""
    mine, theirs = fresh_keys(2)
    store.save([(mine, os.urandom(4096)), (theirs, os.urandom(4096))])
    raw.set(theirs, raw.get(mine))
    loaded, stats = store.load([mine, theirs])
    assert loaded[0] is not None and loaded[1] is None and stats.failed == 1


def test_an_untagged_or_truncated_block_is_a_miss(store, raw):
    bare, short, empty = fresh_keys(3)
    raw.set(bare, os.urandom(4096))  # planted by someone without the secret
    raw.set(short, b"tiny")  # shorter than a tag
    raw.set(empty, b"")
    assert store.load([bare, short, empty])[0] == [None, None, None]
    assert store.rejected == 3


def test_a_block_sealed_with_another_secret_is_a_miss(store, redis_url):
    [key] = fresh_keys(1)
    BlockStore(redis_url, 60, Signer(b"another stack's secret!")).save([(key, os.urandom(4096))])
    loaded, stats = store.load([key])
    assert loaded == [None] and (stats.blocks, stats.failed) == (0, 1)


def test_a_missing_block_is_still_a_plain_miss(store):
    loaded, stats = store.load(fresh_keys(2))
    assert loaded == [None, None] and stats.failed == 2 and store.rejected == 0  # not counted as tampering


def test_a_store_without_a_signer_cannot_load(redis_url):
    """The fake engine's store only asks whether blocks exist; one that could load unchecked
    bytes must not exist."""
    with pytest.raises(RuntimeError, match="no signer"):
        BlockStore(redis_url, 60).load(fresh_keys(1))


def test_seal_binds_purpose_key_and_payload():
    sealed = seal(SIGNER, "p:blk:L:a", b"payload")
    assert len(sealed) == TAG_BYTES + len(b"payload")
    assert unseal(SIGNER, "p:blk:L:a", sealed) == b"payload"
    assert unseal(SIGNER, "p:blk:L:b", sealed) is None
    # a tag made with the same secret for another purpose (a resume token's) does not pass
    other = SIGNER.tag("resume", "p:blk:L:a", b"payload", size=TAG_BYTES) + b"payload"
    assert unseal(SIGNER, "p:blk:L:a", other) is None


def test_the_secret_files_path_reaches_the_connector_never_the_key(tmp_path):
    """The connector runs in vLLM's engine process: the worker hands it the path of the stack
    secret in kv_connector_extra_config (the key stays in the file, out of vLLM's config and logs)."""
    import dataclasses

    from inference.pools import pool_named
    from inference.profiles import kv_transfer_config
    from services.processes import engine_setup
    from services.settings import Settings

    (tmp_path / "secret").write_text("the-stacks-own-signing-key-0123456789\n")
    settings = Settings(redis_url="redis://r:1/0", secret_file=str(tmp_path / "secret"))
    for role in ("prefill", "decode", "aggregated"):
        extra = kv_transfer_config(dataclasses.replace(engine_setup(settings), secret_file=str(tmp_path / "secret")),
                                   pool_named(role))["kv_connector_extra_config"]
        assert extra["secret_file"] == str(tmp_path / "secret")
        assert "signing-key" not in repr(extra)
    assert engine_setup(settings).secret_file == settings.bus.secret_file  # services/processes.py composes it
