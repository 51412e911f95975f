"""The role table (bus/permissions.py) and the logins (bus/credentials.py), as pure functions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bus.capture import subject_matches
from bus.section import redact_url
from bus.credentials import (
    BusAuth,
    CredentialsError,
    NatsLogin,
    client_login,
    generate_logins,
    load_logins,
    save_logins,
)
from bus.permissions import (
    ROLES,
    Permissions,
    User,
    authorization_block,
    client_user_key,
    edge_user_key,
    permissions,
    role_users,
)
from bus.roles import RUNTIME_ROLES, Role
from bus.subjects import Subjects
from services.nats_auth import nats_auth
from services.settings import Settings

S = Subjects("gs")
REGIONS = ("eu",)  # the server holds eu's streams: rights name them
REQUEST, DECODE_JOB, EVENT = S.request("eu", "batch", "acme", "r1"), S.decode("eu", "batch"), S.events("eu", "e1", "r1")
OTHER_EVENT = S.events("eu", "e2", "r2")
STREAMS = ("GS_REQ_eu", "GS_DECODE_eu", "GS_CAPTURE_eu", "GS_DLQ_eu")


def may(patterns: tuple[str, ...], subject: str) -> bool:
    return any(subject_matches(p, subject) for p in patterns)


def may_publish(role: str, subject: str, subjects: Subjects = S, edge_id: str | None = None,
                tenant: str | None = None) -> bool:
    return may(permissions(role, subjects, edge_id, REGIONS, tenant).publish, subject)


def may_subscribe(role: str, subject: str, subjects: Subjects = S, edge_id: str | None = None,
                  tenant: str | None = None) -> bool:
    return may(permissions(role, subjects, edge_id, REGIONS, tenant).subscribe, subject)


def test_an_edge_publishes_requests_and_cancels_and_reads_events_and_heartbeats_only():
    assert may_publish("edge", REQUEST) and may_publish("edge", S.cancel("eu"))
    for subject in (DECODE_JOB, EVENT, S.heartbeat("eu", "prefill"), S.dead_letter("eu", "req"),
                    "gs.cap.req.eu.batch", "gs.bell.req.eu.batch"):
        assert not may_publish("edge", subject), subject
    assert may_subscribe("edge", EVENT) and may_subscribe("edge", S.heartbeat("eu", "decode"))
    for subject in (REQUEST, DECODE_JOB, S.cancel("eu"), "gs.bell.req.eu.batch"):
        assert not may_subscribe("edge", subject), subject


def test_an_edge_with_an_id_reads_only_its_own_events():
    assert may_subscribe("edge", EVENT, edge_id="e1")
    assert not may_subscribe("edge", OTHER_EVENT, edge_id="e1")
    assert may_subscribe("edge", OTHER_EVENT)  # the shared edge login: any edge's, to adopt requests


def test_prefill_takes_requests_and_hands_on_decode_jobs():
    assert may_publish("prefill", DECODE_JOB) and may_publish("prefill", EVENT)
    assert may_publish("prefill", S.heartbeat("eu", "prefill")) and may_publish("prefill", S.dead_letter("eu", "req"))
    assert not may_publish("prefill", REQUEST)
    assert not may_publish("prefill", S.heartbeat("eu", "decode"))  # nobody speaks for another pool
    assert may_publish("prefill", "$JS.API.CONSUMER.MSG.NEXT.GS_REQ_eu.req-eu-batch")
    assert may_publish("prefill", "$JS.ACK.GS_REQ_eu.req-eu-batch.1.2.3.4.5")
    assert not may_publish("prefill", "$JS.API.CONSUMER.MSG.NEXT.GS_DECODE_eu.decode-eu-batch")
    assert may_subscribe("prefill", "gs.bell.req.eu.batch") and may_subscribe("prefill", S.cancel("eu"))
    assert may_subscribe("prefill", "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.GS_REQ_eu.req-eu-batch")
    assert not may_subscribe("prefill", REQUEST) and not may_subscribe("prefill", EVENT)


def test_decode_takes_decode_jobs_and_publishes_events_only():
    assert may_publish("decode", EVENT) and may_publish("decode", S.heartbeat("eu", "decode"))
    assert not may_publish("decode", DECODE_JOB) and not may_publish("decode", REQUEST)
    assert may_publish("decode", "$JS.API.CONSUMER.MSG.NEXT.GS_DECODE_eu.decode-eu-batch")
    assert may_publish("decode", "$JS.ACK.GS_DECODE_eu.decode-eu-batch.1.2.3.4.5")
    assert not may_publish("decode", "$JS.ACK.GS_REQ_eu.req-eu-batch.1.2.3.4.5")
    assert not may_publish("decode", "$JS.API.STREAM.MSG.DELETE.GS_REQ_eu")
    assert may_subscribe("decode", "gs.bell.decode.eu.batch") and not may_subscribe("decode", "gs.bell.req.eu.batch")


def test_aggregated_takes_requests_and_never_publishes_work():
    assert may_publish("aggregated", EVENT) and may_publish("aggregated", S.heartbeat("eu", "aggregated"))
    assert not may_publish("aggregated", REQUEST) and not may_publish("aggregated", DECODE_JOB)
    assert may_publish("aggregated", "$JS.ACK.GS_REQ_eu.req-eu-batch.1.2.3.4.5")


def test_runtime_roles_see_their_streams_read_the_capture_and_get_replies_but_never_change_a_work_stream():
    for role in RUNTIME_ROLES:
        p = permissions(role, S, regions=REGIONS)
        assert all(may(p.publish, f"$JS.API.STREAM.INFO.{stream}") for stream in STREAMS), role
        assert may(p.publish, "$JS.API.CONSUMER.CREATE.GS_CAPTURE_eu.abc.gs.evt.*.r1")
        assert may(p.publish, "$JS.API.STREAM.MSG.GET.GS_CAPTURE_eu") and may(p.publish, "$JS.FC.GS_CAPTURE_eu.x.y")
        assert may(p.subscribe, "_INBOX.abc.def")
        for stream in ("GS_REQ_eu", "GS_DECODE_eu", "GS_DLQ_eu"):
            for verb in ("CREATE", "UPDATE", "DELETE"):
                assert not may(p.publish, f"$JS.API.STREAM.{verb}.{stream}"), (role, verb, stream)
        # only an edge makes mirrors of other regions' captures (named after them)
        for verb in ("CREATE", "UPDATE", "DELETE"):
            assert may(p.publish, f"$JS.API.STREAM.{verb}.GS_CAPTURE_eu") == (role == Role.EDGE), (role, verb)


def test_a_client_publishes_only_its_tenants_requests_and_reads_only_its_own_events():
    def pub(subject: str) -> bool:
        return may_publish("client", subject, edge_id="svc1", tenant="acme")

    def sub(subject: str) -> bool:
        return may_subscribe("client", subject, edge_id="svc1", tenant="acme")

    assert pub(S.request("eu", "batch", "acme", "r1")) and pub(S.request("us", "interactive", "acme", "r2"))
    assert pub(S.cancel("eu"))
    assert not pub(S.request("eu", "batch", "other", "r1")) and not pub(DECODE_JOB) and not pub(EVENT)
    assert sub(S.events("eu", "svc1", "r1")) and sub(S.events("us", "svc1", "r9")) and sub("_INBOX.x.y")
    assert not sub(S.events("eu", "svc2", "r1")) and not sub(S.events_of_request("r1"))
    for stream in STREAMS:  # no capture (every tenant's prompts), no stream's config
        for api in ("STREAM.CREATE", "STREAM.UPDATE", "STREAM.DELETE", "STREAM.INFO", "STREAM.MSG.GET",
                    "CONSUMER.CREATE", "DIRECT.GET"):
            assert not pub(f"$JS.API.{api}.{stream}"), (api, stream)
    assert not sub(S.capture_copies()) and not sub("gs.bell.req.eu.batch")


def test_a_client_login_is_bound_to_one_tenant_and_one_client_id():
    for edge_id, tenant in ((None, "acme"), ("svc1", None), ("*", "acme"), ("svc1", "*")):
        with pytest.raises(ValueError, match="bound to one tenant and one client id"):
            permissions("client", S, edge_id, REGIONS, tenant)
    with pytest.raises(ValueError):
        permissions("client", S, "svc1", REGIONS, "a.b")
    user, = role_users({client_user_key("acme", "svc1"): ("client-acme-svc1", "pw")}, [S], REGIONS)
    assert user.permissions.publish == ("gs.req.*.*.acme.*", "gs.cancel.>")
    assert user.permissions.subscribe == ("_INBOX.>", "gs.evt.*.svc1.*")
    with pytest.raises(ValueError):
        role_users({"client": ("client", "pw")}, [S], REGIONS)  # a client login with no binding


def test_ops_may_do_everything():
    assert permissions("ops", S) == Permissions(publish=(">",), subscribe=(">",))


def test_unknown_roles_are_refused():
    with pytest.raises(ValueError, match="unknown bus role"):
        permissions("admin", S)


def test_the_any_prefix_table_is_the_same_rules_for_every_prefix():
    anyp = Subjects.any_prefix()
    other = Subjects("t0123")
    assert may_publish("edge", other.request("local", "batch", "t", "r"), anyp)
    assert not may_publish("edge", other.decode("local", "batch"), anyp)
    assert not may_publish("edge", other.events("eu", "e", "r"), anyp)
    assert may_publish("prefill", other.decode("local", "batch"), anyp)
    assert not may_publish("decode", other.request("local", "batch", "t", "r"), anyp)
    assert may_subscribe("decode", other.doorbell("decode", "local").replace(">", "batch"), anyp)
    # stream names are one token, so the JetStream API rights cover every stream
    assert anyp.stream("req", "eu") == "*" and may_publish("edge", "$JS.API.CONSUMER.MSG.NEXT.T0123_DECODE_eu.x", anyp)
    assert not may_publish("edge", "$JS.API.CONSUMER.MSG.NEXT.GS_DECODE_eu.x", S)


def test_the_authorization_block_lists_users_with_quoted_subjects_and_never_prints_passwords():
    users = role_users({"edge": ("edge", "pw1"), edge_user_key("e1"): ("edge-e1", "pw2")}, [S])
    block = authorization_block(users)
    assert block.startswith("authorization {") and '"$JS.API.STREAM.NAMES"' in block
    entries = [json.loads(line.strip().rstrip(",")) for line in block.splitlines() if line.strip().startswith("{")]
    assert [e["user"] for e in entries] == ["edge", "edge-e1"]
    assert "gs.evt.*.e1.*" in entries[1]["permissions"]["subscribe"]["allow"]
    assert "pw1" not in repr(users) and "pw1" not in repr(User("u", "pw1", users[0].permissions))
    assert "secret" not in repr(NatsLogin("u", "secret"))


def test_several_prefixes_merge_into_one_user():
    user, = role_users({"edge": ("edge", "pw")}, [S, Subjects("sandbox")])
    publish = user.permissions.publish
    assert may(publish, "gs.req.eu.batch.t.r") and may(publish, "sandbox.req.eu.batch.t.r")


def test_logins_are_saved_private_and_read_back(tmp_path: Path):
    logins = generate_logins()
    roles = set(ROLES) - {Role.CLIENT}  # each client login is bound to a tenant: made one by one
    assert set(logins) == roles and len({login.password for login in logins.values()}) == len(roles)
    path = tmp_path / "d" / "credentials.json"
    save_logins(path, logins)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_logins(path) == logins
    path.write_text("{not json")
    with pytest.raises(CredentialsError, match="cannot read NATS credentials"):
        load_logins(path)


def test_a_process_takes_its_own_login_before_its_roles(tmp_path: Path):
    path = tmp_path / "logins.json"
    save_logins(path, {"edge": NatsLogin("edge", "a"), "edge:e1": NatsLogin("edge-e1", "b"),
                       "ops": NatsLogin(creds="/etc/ops.creds")})
    settings = Settings(nats_credentials=str(path))
    assert BusAuth.of(settings.bus, "edge").login.user == "edge"
    assert BusAuth.of(settings.replace(worker_id="e1").bus, "edge").login.user == "edge-e1"
    assert BusAuth.of(settings.bus, "ops").connect_options() == {"user_credentials": "/etc/ops.creds"}
    assert BusAuth.of(settings.bus, "edge").connect_options() == {"user": "edge", "password": "a"}
    with pytest.raises(CredentialsError, match="no NATS login for the role 'decode'"):
        BusAuth.of(settings.bus, "decode")


def test_a_client_takes_the_client_login_that_matches_its_tenant_and_id(tmp_path: Path):
    path = tmp_path / "logins.json"
    save_logins(path, {"ops": NatsLogin("ops", "o"), **dict([client_login("acme", "svc1")])})
    bus = Settings(nats_credentials=str(path)).bus
    auth = BusAuth.of(bus, "client")  # the only one
    assert (auth.tenant, auth.client_id, auth.login.user) == ("acme", "svc1", "client-acme-svc1")
    assert BusAuth.of(bus, "client", "acme", "svc1").login == auth.login
    save_logins(path, {**load_logins(path), **dict([client_login("acme", "svc2")])})
    with pytest.raises(CredentialsError, match="2 NATS client logins matching client:acme:<client_id>"):
        BusAuth.of(bus, "client", "acme")
    with pytest.raises(CredentialsError, match="no NATS client logins matching client:other:<client_id>"):
        BusAuth.of(bus, "client", "other")


def test_without_a_credentials_file_a_process_connects_without_a_login(tmp_path: Path):
    settings = Settings(data_dir=tmp_path)
    assert settings.bus.credentials_file is None and BusAuth.of(settings.bus, "edge").login is None
    save_logins(tmp_path / "nats" / "credentials.json", generate_logins())  # what `grokstack up` writes
    settings = Settings(data_dir=tmp_path)  # a process started after it, in the same directory
    assert settings.bus.credentials_file == tmp_path / "nats" / "credentials.json"
    assert BusAuth.of(settings.bus, "edge").login.user == "edge"


def test_passwords_in_urls_are_redacted():
    assert redact_url("redis://grokstack:s3cret@127.0.0.1:6379/0") == "redis://grokstack:***@127.0.0.1:6379/0"
    assert redact_url("rediss://:s3cret@h:6380/0?ssl_ca_certs=ca.pem") == "rediss://:***@h:6380/0?ssl_ca_certs=ca.pem"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    shown = repr(Settings(redis_url="redis://grokstack:s3cret@h:1/0", nats_url="nats://u:pw@h:4222"))
    assert "s3cret" not in shown and "pw@" not in shown and "redis://grokstack:***@h:1/0" in shown


def test_nats_auth_renders_a_block_and_writes_the_logins(tmp_path: Path):
    block = nats_auth(["gs"], ["eu-1"], tmp_path / "logins.json", clients=["acme:svc1"])
    logins = load_logins(tmp_path / "logins.json")
    assert set(logins) == {*(set(ROLES) - {Role.CLIENT}), "edge:eu-1", "client:acme:svc1"}
    assert logins["edge:eu-1"].user == "edge-eu-1" and logins["client:acme:svc1"].user == "client-acme-svc1"
    assert all(login.password in block for login in logins.values())
    assert '"gs.req.*.*.acme.*"' in block
    for bad in (dict(edge_ids=["eu.1"]), dict(clients=["acme"]), dict(clients=["a.b:svc"]), dict(clients=["acme:"])):
        with pytest.raises(ValueError):
            nats_auth(["gs"], bad.get("edge_ids", []), tmp_path / "bad.json", clients=bad.get("clients"))
