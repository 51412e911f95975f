"""The stack's Redis user is confined (kv_store/acl.py), on a real Redis-compatible server: the
embedded one `grokstack up` starts, and one run from the production example infra/redis/users.acl.
The stack works through its user (blocks saved, loaded, transfer records written and read), and
the user is refused every key outside its prefix, scripting, pub/sub and the admin commands."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from bus.signing import Signer
from kv_store.block_store import BlockStore
from kv_store.keys import prompt_block_keys, transfer_stats_key
from kv_store.transfers import TransferRecords
from services.embedded import EmbeddedRedis, free_port, redis_server_binary
from tests.conftest import REPO

PASSWORD = "a-long-test-password-for-the-acl-file"


def _ready(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"-NOAUTH"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


@pytest.fixture(params=["embedded", "infra"], scope="module")
def stack_url(request, tmp_path_factory) -> str:
    """The stack user's URL on a server whose prefix is the default, `gskv`."""
    workdir = tmp_path_factory.mktemp(f"redis-{request.param}")
    if request.param == "embedded":
        server = EmbeddedRedis(workdir, maxmemory="64mb")  # KvConfig's prefix by default
        url = server.start()
        yield url
        server.stop()
        return
    acl = (REPO / "infra/redis/users.acl").read_text().replace(
        ">CHANGE-ME-to-a-long-random-password", f">{PASSWORD}")
    (workdir / "users.acl").write_text(acl)
    port = free_port()
    (workdir / "redis.conf").write_text(
        f"port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {workdir}\n"
        f"aclfile {workdir / 'users.acl'}\n")
    with open(workdir / "server.log", "w") as log:
        proc = subprocess.Popen([redis_server_binary(), str(workdir / "redis.conf")], stdout=log, stderr=log)
    try:
        assert _ready(port, proc), (workdir / "server.log").read_text()
        yield f"redis://grokstack:{PASSWORD}@127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def client(stack_url):
    with redis.Redis.from_url(stack_url) as c:
        yield c


async def test_the_stack_works_through_its_user(stack_url):
    prefix = f"gskv:{uuid.uuid4().hex[:8]}"
    store = BlockStore(stack_url, 60, Signer(b"s" * 32))
    keys = prompt_block_keys(prefix, "L", list(range(64)), 32, 2, "tenant")
    blocks = [b"a" * 4096, b"b" * 4096]
    saved = store.save(list(zip(keys, blocks, strict=True)))
    assert saved.failed == 0 and store.present_prefix(keys) == 2
    loaded, stats = store.load(keys)
    assert loaded == blocks and stats.failed == 0
    store.record(transfer_stats_key(prefix, "r1"), "save", saved)
    store.record(transfer_stats_key(prefix, "r1"), "load", stats)
    records = TransferRecords(stack_url, prefix)
    try:
        await records.ping()
        record = await records.read("r1")
    finally:
        await records.close()
    assert record.save.blocks == record.load.blocks == 2 and record.save.bytes == record.load.bytes > 0


def test_a_key_outside_the_prefix_is_refused(client):
    for key in ("other:blk:x", "gskvx:blk:x", "gskv", "stolen"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set(key, b"1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.getex(key)
    with pytest.raises(redis.exceptions.NoPermissionError):  # one refused key refuses the command
        client.exists("gskv:ok", "elsewhere")


def test_the_stack_never_touches_keys_outside_its_prefix_through_the_store(stack_url):
    """A store misconfigured with another prefix fails like a Redis outage: a miss, a log line."""
    store = BlockStore(stack_url, 60, Signer(b"s" * 32))
    saved = store.save([("elsewhere:blk:x", b"kv")])
    assert (saved.blocks, saved.failed) == (0, 1)
    assert store.present_prefix(["elsewhere:blk:x"]) == 0


@pytest.mark.parametrize("command", [
    ("EVAL", "return 1", "0"),
    ("EVAL", "return redis.call('set', KEYS[1], 1)", "1", "gskv:x"),
    ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"),
    ("SCRIPT", "LOAD", "return 1"),
    ("FUNCTION", "LIST"),
    ("FCALL", "f", "0"),
    ("PUBLISH", "ch", "hi"),
    ("SUBSCRIBE", "ch"),
    ("PSUBSCRIBE", "*"),
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "*"),
    ("CONFIG", "SET", "maxmemory", "1"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("RANDOMKEY",),
    ("INFO",),
    ("DEBUG", "SLEEP", "0"),
    ("SHUTDOWN",),
    ("MONITOR",),
    ("ACL", "LIST"),
    ("CLIENT", "LIST"),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("DEL", "gskv:x"),
    ("MIGRATE", "127.0.0.1", "1", "gskv:x", "0", "1000"),
    ("SAVE",),
    ("REPLICAOF", "127.0.0.1", "1"),
    ("MODULE", "LIST"),
])
def test_scripting_pubsub_and_admin_commands_are_refused(client, command):
    # NOPERM; DEBUG is off in the server's own configuration too, which answers first
    with pytest.raises(redis.exceptions.ResponseError, match="no permissions|DEBUG command not allowed"):
        client.execute_command(*command)
    assert client.ping()  # the user's connection, and the server, are still fine


def test_the_embedded_servers_operator_may_inspect_and_clear_the_cache(tmp_path: Path):
    server = EmbeddedRedis(tmp_path, maxmemory="64mb", key_prefix="mykv")
    server.start()
    try:
        with redis.Redis.from_url(server.url) as stack, redis.Redis.from_url(server.ops_url) as ops:
            assert stack.set("mykv:blk:1", b"x") and not stack.exists("mykv:blk:2")
            with pytest.raises(redis.exceptions.NoPermissionError):
                stack.set("gskv:blk:1", b"x")  # the prefix given, not the default
            assert list(ops.scan_iter("mykv:*")) == [b"mykv:blk:1"] and ops.delete("mykv:blk:1") == 1
            with pytest.raises(redis.exceptions.NoPermissionError):
                ops.flushall()
            with pytest.raises(redis.exceptions.NoPermissionError):
                ops.execute_command("CONFIG", "SET", "maxmemory", "1")
        for secret in (server.password_file, server.ops_password_file, tmp_path / "redis.conf"):
            assert secret.stat().st_mode & 0o777 == 0o600, secret
    finally:
        server.stop()
