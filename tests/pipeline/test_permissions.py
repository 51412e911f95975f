"""Who may do what, enforced by the real servers: the session's nats-server (every prefix, as
`grokstack up` runs it), one that serves a single prefix (as in production), and Redis."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import nats
import pytest
import redis.asyncio as aioredis
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NotFoundError

from bus.codec import encode
from bus.credentials import BusAuth, NatsLogin, save_logins
from bus.jetstream import BusUnavailable, connect, declare_streams, ensure_streams, stream_configs
from bus.messages import Cancel, TokenEvent
from bus.subjects import Subjects
from edge.client import EdgeClient
from services.embedded import EmbeddedNats
from tests.pipeline.harness import bus_client, eventually, running_stack
from tests.pipeline.test_chat_flow import engines, expected


async def login_as(settings, role: str, errors: list[str]) -> nats.NATS:
    """A connection as `role` that records what the server refuses."""
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
    return await nats.connect(settings.bus.nats_url, error_cb=on_error,
                              **BusAuth.of(settings.bus, role).connect_options())


async def watch(nc: nats.NATS, *subjects: str) -> list[str]:
    seen: list[str] = []

    async def record(msg) -> None:
        seen.append(msg.subject)
    for subject in subjects:
        await nc.subscribe(subject, cb=record)
    await nc.flush()
    return seen


async def stored(js, stream: str) -> int:
    try:
        return (await js.stream_info(stream)).state.messages
    except NotFoundError:
        return 0


async def refused(errors: list[str], subject: str) -> bool:
    """The server said no (nats-py reports it, lower-cased, to the error callback)."""
    subject = subject.lower()
    return bool(await eventually(
        lambda: any("permissions violation" in e.lower() and subject in e.lower() for e in errors), 5))


async def test_an_edge_cannot_publish_decode_jobs_or_token_events(settings):
    s = settings.bus.subjects
    event = encode(TokenEvent(request_id="r1", seq=0, text="forged", token_ids=[1]))
    async with bus_client(settings) as watcher:
        seen = await watch(watcher, s.all_work("decode"), s.all_events(), s.all_cancels())
        errors: list[str] = []
        edge = await login_as(settings, "edge", errors)
        try:
            await edge.publish(s.decode("local", "batch"), b"{}")
            await edge.publish(s.events("local", "someone", "r1"), event)
            with pytest.raises(NatsTimeout):  # JetStream never sees it, so never acks
                await edge.jetstream().publish(s.decode("local", "interactive"), b"{}", timeout=1)
            await edge.publish(s.cancel("local"), encode(Cancel(request_id="r1", reason="test")))
            await edge.flush()
            assert await refused(errors, s.decode("local", "batch"))
            assert await refused(errors, s.events("local", "someone", "r1"))
            # what an edge may do, it does: a cancel goes through
            assert await eventually(lambda: s.cancel("local") in seen)
        finally:
            await edge.close()
        await asyncio.sleep(0.2)
        assert seen == [s.cancel("local")]
        assert await stored(watcher.jetstream(), s.stream("decode", "local")) == 0


async def test_workers_cannot_publish_what_is_not_theirs(settings):
    s = settings.bus.subjects
    async with bus_client(settings) as watcher:
        seen = await watch(watcher, s.all_work("req"), s.all_work("decode"), s.all_heartbeats())
        errors: list[str] = []
        decode = await login_as(settings, "decode", errors)
        prefill = await login_as(settings, "prefill", errors)
        try:
            for nc in (decode, prefill):
                await nc.publish(s.request("local", "batch", "public", "r1"), b"{}")
            await decode.publish(s.decode("local", "batch"), b"{}")
            await decode.publish(s.heartbeat("local", "prefill"), b"{}")  # posing as another pool
            await decode.publish(s.heartbeat("local", "decode"), b"{}")
            ack = await prefill.jetstream().publish(s.decode("local", "batch"), b"{}", timeout=5)
            assert ack.stream == s.stream("decode", "local")  # handing work on is prefill's job
            await asyncio.gather(decode.flush(), prefill.flush())
            assert await refused(errors, s.request("local", "batch", "public", "r1"))
            assert await refused(errors, s.heartbeat("local", "prefill"))
        finally:
            await decode.close()
            await prefill.close()
        await eventually(lambda: len(seen) >= 2)
        await asyncio.sleep(0.2)
        assert sorted(seen) == sorted([s.heartbeat("local", "decode"), s.decode("local", "batch")])
        assert await stored(watcher.jetstream(), s.stream("req", "local")) == 0


async def test_a_subscription_outside_the_role_gets_nothing(settings):
    s = settings.bus.subjects
    errors: list[str] = []
    edge = await login_as(settings, "edge", errors)
    try:
        seen = await watch(edge, s.all_work("req"))
        async with bus_client(settings) as operator:
            await operator.publish(s.request("local", "batch", "public", "r1"), b"{}")
            await operator.flush()
        assert await refused(errors, s.all_work("req"))
        assert seen == []
    finally:
        await edge.close()


async def test_a_wrong_password_or_no_login_cannot_connect(settings, tmp_path: Path):
    wrong = tmp_path / "wrong.json"
    save_logins(wrong, {"edge": NatsLogin("edge", "not-the-password")})
    with pytest.raises(BusUnavailable, match="as 'edge'.*[Aa]uthorization"):
        await connect(settings.bus.nats_url, "test",
                      BusAuth.of(settings.bus.replace(nats_credentials=str(wrong)), "edge"))
    with pytest.raises(BusUnavailable, match="[Aa]uthorization"):
        await connect(settings.bus.nats_url, "test")
    # a worker started with it says so and exits
    result = subprocess.run([sys.executable, "-m", "services.cli", "decode", "--nats-url", settings.bus.nats_url,
                             "--nats-credentials", str(wrong), "--redis-url", settings.kv.redis_url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"cannot connect to NATS at {settings.bus.nats_url}" in result.stderr
    assert "no NATS login for the role 'decode'" in result.stderr


async def client_login(settings, errors: list[str]) -> nats.NATS:
    """The embedded server's client login, `client:public:dev` (services/embedded.py)."""
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
    auth = BusAuth.of(settings.bus, "client")
    assert (auth.tenant, auth.client_id) == ("public", "dev")
    return await nats.connect(settings.bus.nats_url, error_cb=on_error, **auth.connect_options())


async def test_a_client_publishes_only_under_its_tenant_and_reads_only_its_own_events(settings):
    s = settings.bus.subjects
    errors: list[str] = []
    client = await client_login(settings, errors)
    try:
        js = client.jetstream(timeout=1)
        ack = await js.publish(s.request("local", "batch", "public", "r1"), b"{}")  # its own tenant: stored
        assert ack.stream == s.stream("req", "local")
        with pytest.raises(NatsTimeout):  # another tenant's: JetStream never sees it
            await js.publish(s.request("local", "batch", "acme", "r2"), b"{}")
        assert await refused(errors, s.request("local", "batch", "acme", "r2"))
        mine = await watch(client, s.events("local", "dev", "r1"))
        others = await watch(client, s.events_of_edge("local", "e2"))
        async with bus_client(settings) as operator:
            await operator.publish(s.events("local", "dev", "r1"), b"{}")
            await operator.publish(s.events("local", "e2", "r3"), b"{}")
            assert await eventually(lambda: mine == [s.events("local", "dev", "r1")])
            assert await refused(errors, s.events_of_edge("local", "e2"))
            assert others == []
            assert await stored(operator.jetstream(), s.stream("req", "local")) == 1
    finally:
        await client.close()


async def test_a_client_cannot_read_the_capture_nor_create_or_update_streams_and_ops_can(settings):
    s = settings.bus.subjects
    errors: list[str] = []
    client = await client_login(settings, errors)
    capture = s.stream("capture", "local")
    try:
        js = client.jetstream(timeout=1)
        with pytest.raises(NatsTimeout):
            await js.pull_subscribe(s.capture_copies(), stream=capture)
        with pytest.raises(NatsTimeout):
            await js.get_last_msg(capture, s.captured_request("local", "batch", "public", "r1"))
        assert await refused(errors, f"$JS.API.STREAM.MSG.GET.{capture}")
        configs = stream_configs(settings.bus.replace(capture_max_mb=1), s)
        with pytest.raises(NatsTimeout):
            await js.update_stream(configs[2])
        fresh = stream_configs(settings.bus.replace(subject_prefix="tclient" + s.prefix[1:]),
                               Subjects("tclient" + s.prefix[1:]))[0]
        with pytest.raises(NatsTimeout):
            await js.add_stream(fresh)
        assert await refused(errors, f"$JS.API.STREAM.CREATE.{fresh.name}")
        async with bus_client(settings, "ops") as operator:
            ops = operator.jetstream()
            assert (await ops.stream_info(capture)).config.max_bytes == 16 * 1024**2
            await declare_streams(ops, settings.bus.replace(capture_max_mb=1), s)  # `grokstack provision`
            assert (await ops.stream_info(capture)).config.max_bytes == 1024**2
    finally:
        await client.close()


async def test_runtime_roles_wait_for_streams_nobody_provisioned_and_say_how_to_make_them(settings):
    bus = settings.bus.replace(subject_prefix="tnone" + settings.bus.subject_prefix[1:], streams_wait_s=1.0)
    errors: list[str] = []
    for role in ("edge", "prefill"):
        nc = await login_as(settings, role, errors)
        try:
            with pytest.raises(BusUnavailable, match=rf"stream {bus.subjects.stream('req', 'local')} does not exist: "
                                                     r"run `grokstack provision`"):
                await ensure_streams(nc.jetstream(), bus, bus.subjects)
            # Neither may make them, nor change the provisioned ones: an edge makes mirrors only on a
            # server that is one JetStream domain of several, and this one is alone.
            with pytest.raises(NatsTimeout):
                await nc.jetstream(timeout=1).add_stream(stream_configs(bus, bus.subjects)[0])
            assert await refused(errors, f"$JS.API.STREAM.CREATE.{bus.subjects.stream('req', 'local')}")
            provisioned = stream_configs(settings.bus, settings.bus.subjects)[0]
            with pytest.raises(NatsTimeout):
                await nc.jetstream(timeout=1).update_stream(provisioned)
            assert await refused(errors, f"$JS.API.STREAM.UPDATE.{provisioned.name}")
            await ensure_streams(nc.jetstream(), settings.bus, settings.bus.subjects)  # provisioned: there at once
        finally:
            await nc.close()


async def test_ops_may_publish_and_read_anything(settings):
    s = settings.bus.subjects
    async with bus_client(settings, "ops") as operator:
        seen = await watch(operator, s.all_events(), s.all_work("decode"), s.all_heartbeats())
        for subject in (s.events("local", "e", "r"), s.decode("local", "batch"), s.heartbeat("local", "decode")):
            await operator.publish(subject, b"{}")
        assert await eventually(lambda: len(seen) == 3)


async def test_the_stack_serves_on_a_server_that_knows_only_its_prefix(settings, tmp_path: Path):
    """The production table (one prefix, JetStream rights per stream) is enough for the real
    wiring, and keeps an edge from pulling decode jobs."""
    server = EmbeddedNats(tmp_path / "nats", prefixes=(settings.bus.subject_prefix,),
                          regions=(settings.bus.region,))
    settings = settings.replace(nats_url=server.start(), nats_credentials=str(server.credentials_file))
    try:
        question = "does the production table let every part do its work"
        async with running_stack(settings, *engines(settings)) as stack:
            async with await EdgeClient.connect(stack.url) as client:
                result = await client.complete([{"role": "user", "content": question}])
            assert result.done and result.text == expected(question)
            s = stack.subjects
            errors: list[str] = []
            edge = await login_as(settings, "edge", errors)
            try:
                decode_jobs = f"{s.stream('decode', 'local')}.{s.consumer('decode', 'local', 'batch')}"
                pull = f"$JS.API.CONSUMER.MSG.NEXT.{decode_jobs}"
                await edge.publish(pull, b'{"batch": 1, "no_wait": true}', reply=edge.new_inbox())
                await edge.flush()
                assert await refused(errors, pull)
                # another prefix is not served at all
                await edge.publish(Subjects("elsewhere").request("local", "batch", "public", "r1"), b"{}")
                await edge.flush()
                assert await refused(errors, "elsewhere.req.local.batch.public.r1")
                # nor may it change a work stream's limits (only `grokstack provision`, as ops)
                with pytest.raises(NatsTimeout):
                    await edge.jetstream(timeout=1).update_stream(stream_configs(settings.bus, s)[0])
                assert await refused(errors, f"$JS.API.STREAM.UPDATE.{s.stream('req', 'local')}")
            finally:
                await edge.close()
    finally:
        server.stop()


async def test_redis_refuses_clients_without_the_stacks_password(settings):
    url = urlsplit(settings.kv.redis_url)
    assert url.username == "grokstack" and url.password
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall(b"SET stolen 1\r\n")
        assert s.recv(64).startswith(b"-NOAUTH")
        s.sendall(b"AUTH default anything\r\n")
        assert s.recv(64).startswith(b"-WRONGPASS")
    bad = aioredis.Redis.from_url(settings.kv.redis_url.replace(url.password, "wrong"))
    with pytest.raises(Exception, match="WRONGPASS|invalid username-password"):
        await bad.ping()
    await bad.aclose()
    good = aioredis.Redis.from_url(settings.kv.redis_url)
    try:
        assert await good.set(f"{settings.kv.kv_key_prefix}:probe", b"1", ex=10)
        with pytest.raises(Exception, match="permission"):
            await good.flushall()  # the stack's user cannot wipe the store
    finally:
        await good.aclose()


def test_the_embedded_servers_keep_their_secrets_private(nats_server, redis_url):
    for path in (nats_server.credentials_file, nats_server.workdir / "nats.conf"):
        assert path.stat().st_mode & 0o777 == 0o600, path


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "grokstack test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_tls_to_nats_with_the_settings_ca(settings, tmp_path: Path):
    """infra/nats/secure.conf's tls block, reached with GROKSTACK_NATS_TLS_CA."""
    from services.embedded import free_port, nats_server_binary
    from services.supervisor import Supervisor

    cert, key = _self_signed(tmp_path)
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: 127.0.0.1:{port}\ntls {{ cert_file: "{cert}", key_file: "{key}" }}\n')
    with Supervisor() as supervisor:
        supervisor.start("nats-tls", [nats_server_binary(), "-c", str(conf)], log=tmp_path / "nats-tls.log")
        url = f"tls://127.0.0.1:{port}"
        trusting = settings.replace(nats_url=url, nats_credentials="", data_dir=tmp_path,
                                    nats_tls_ca=str(cert))
        async def up() -> bool:
            try:
                nc = await connect(url, "tls-test", BusAuth.of(trusting.bus, "edge"))
            except BusUnavailable:
                return False
            await nc.close()
            return True
        assert await eventually(up, 10, 0.2)
        with pytest.raises(BusUnavailable):  # the system's CAs do not know this one
            await connect(url, "tls-test", BusAuth.of(trusting.replace(nats_tls_ca="").bus, "edge"))


async def test_a_worker_started_before_provisioning_exits_saying_how_to_make_its_streams(settings):
    fresh = "tnone" + settings.bus.subject_prefix[1:]
    result = subprocess.run([sys.executable, "-m", "services.cli", "decode", "--nats-url", settings.bus.nats_url,
                             "--nats-credentials", settings.bus.nats_credentials, "--redis-url", settings.kv.redis_url,
                             "--subject-prefix", fresh, "--streams-wait-s", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    stream = Subjects(fresh).stream("req", "local")
    assert f"grokstack decode: stream {stream} does not exist: run `grokstack provision`" in result.stderr
