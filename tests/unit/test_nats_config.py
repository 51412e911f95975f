"""The nats-server configs of services/nats_config.py: what the embedded servers run has not
changed, the production options render where they belong, and the real binary accepts every
config (`nats-server -t`, which also loads the TLS files). The example configs of
infra/nats/regions/ are the renderer's output for EXAMPLE (`python -m tests.unit.test_nats_config`
rewrites them)."""

from __future__ import annotations

import datetime
import json
from collections import defaultdict
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from bus.credentials import NatsLogin, load_logins
from bus.permissions import ROLES, client_user_key, role_users
from bus.roles import Role
from bus.subjects import Subjects
from services.embedded import EmbeddedNats, EmbeddedTransit, nats_server_binary
from services.nats_config import (
    Cluster,
    Peer,
    RegionPlan,
    Tls,
    accounts_block,
    accounts_file,
    jetstream_server,
    region_configs,
    transit_server,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "infra" / "nats" / "regions"


def _hosts(kind: str, region: str, count: int) -> tuple[str, ...]:
    """Pod names of a StatefulSet `<kind>-<region>` behind a headless Service of that name."""
    return tuple(f"{kind}-{region}-{i}.{kind}-{region}.nats.svc.cluster.local" for i in range(count))


# Three regions, one Kubernetes cluster each: 3 JetStream nodes, 2 transit nodes, a gateway LoadBalancer.
EXAMPLE = [RegionPlan(r, _hosts("js", r, 3), _hosts("transit", r, 2), f"gateway.{r}.example.net:7222")
           for r in ("eu", "us", "ap")]
EXAMPLE_TLS = {"client_tls": Tls("/etc/nats/tls/server.pem", "/etc/nats/tls/server-key.pem", "/etc/nats/tls/ca.pem"),
               "node_tls": Tls("/etc/nats/tls/node.pem", "/etc/nats/tls/node-key.pem", "/etc/nats/tls/node-ca.pem")}


def _users(password: str = "CHANGE-ME", regions: tuple[str, ...] = ("eu", "us", "ap")):
    """The role users of each region's servers, as `grokstack nats-config` makes them: every region
    holds its own streams and the mirrors of the others', and its edges make only those mirrors."""
    logins = {str(role): (str(role), password) for role in ROLES if role != Role.CLIENT}
    logins[client_user_key("acme", "billing")] = ("client-acme-billing", password)  # `--client acme:billing`
    return {region: role_users(logins, [Subjects("gs")], regions, mirrored=tuple(r for r in regions if r != region))
            for region in regions}


NO_USERS: defaultdict[str, list] = defaultdict(list)


def example_files() -> dict[str, str]:
    return region_configs(EXAMPLE, _users(), NatsLogin("leaf", "CHANGE-ME-LEAF"), NatsLogin("sys", "CHANGE-ME"),
                          gateway_login=NatsLogin("gateway", "CHANGE-ME-GATEWAY"), **EXAMPLE_TLS)


def nats_server_test(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30)


def assert_valid(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).write_text(text)
    for name in files:
        if not name.startswith("accounts-"):  # included by the others, not a server's config by itself
            result = nats_server_test(directory / name)
            assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}\n{files[name]}"


# What the renderers wrote before the production options existed, byte for byte.
BEFORE_JETSTREAM = (
    'server_name: "js-eu"\nlisten: 127.0.0.1:4222\nmax_payload: 8MB\n'
    'jetstream { domain: "eu", store_dir: "/data/js", max_file_store: 64GB, max_memory_store: 512MB }\n'
    'leafnodes { remotes: [ { urls: ["nats-leaf://leaf:pw@127.0.0.1:7422"], account: APP, '
    'deny_imports: ["*.hb.>"], deny_exports: ["*.hb.>"] } ] }\nACCOUNTS\n')
BEFORE_ALONE = ('server_name: "js-local"\nlisten: 127.0.0.1:-1\nmax_payload: 8MB\n'
                'jetstream { store_dir: "/data/js", max_file_store: 64GB, max_memory_store: 512MB }\nACCOUNTS\n')
BEFORE_TRANSIT = (
    'server_name: "transit-eu"\nlisten: 127.0.0.1:4223\nmax_payload: 8MB\ngateway {\n  name: "transit-eu"\n'
    '  listen: 127.0.0.1:7222\n  gateways: [ { name: "transit-us", urls: ["nats://127.0.0.1:7223"] }, '
    '{ name: "transit-ap", urls: ["nats://127.0.0.1:7224"] } ]\n}\nleafnodes { listen: 127.0.0.1:7422 }\nACCOUNTS\n')
BEFORE_ADVERTISED = (
    'server_name: "transit-eu"\nlisten: 127.0.0.1:4223\nmax_payload: 4MB\ngateway {\n  name: "transit-eu"\n'
    '  listen: 127.0.0.1:7222\n  advertise: "127.0.0.1:9999"\n  gateways: [  ]\n}\n'
    'leafnodes { listen: 127.0.0.1:7422 }\nACCOUNTS\n')


def test_without_the_new_options_the_output_is_what_it_was():
    assert jetstream_server("js-eu", 4222, Path("/data/js"), "ACCOUNTS\n", domain="eu",
                            leaf_remote="nats-leaf://leaf:pw@127.0.0.1:7422") == BEFORE_JETSTREAM
    assert jetstream_server("js-local", -1, Path("/data/js"), "ACCOUNTS\n") == BEFORE_ALONE
    peers = [Peer("us", "nats://127.0.0.1:7223"), Peer("ap", "nats://127.0.0.1:7224")]
    assert transit_server("eu", 4223, 7422, 7222, "ACCOUNTS\n", peers) == BEFORE_TRANSIT
    assert transit_server("eu", 4223, 7422, 7222, "ACCOUNTS\n", [], advertise="127.0.0.1:9999",
                          max_payload_mb=4) == BEFORE_ADVERTISED


def test_the_embedded_servers_write_what_they_wrote(tmp_path: Path):
    """services/embedded.py's configs (nothing started): the same as before, around its accounts."""
    nats = EmbeddedNats(tmp_path / "eu", domain="eu", leaf_remote="nats-leaf://leaf:pw@127.0.0.1:7422",
                        credentials_file=tmp_path / "credentials.json")
    accounts = nats.accounts()
    assert nats.config() == BEFORE_JETSTREAM.replace("/data/js", str(tmp_path / "eu" / "jetstream")).replace(
        "listen: 127.0.0.1:4222", "listen: 127.0.0.1:-1").replace("ACCOUNTS\n", accounts)
    transit = EmbeddedTransit(tmp_path / "transit", "eu", tmp_path / "credentials.json",
                              (Peer("us", "nats://127.0.0.1:7223"), Peer("ap", "nats://127.0.0.1:7224")),
                              ports=(4223, 7422, 7222))
    assert transit.config() == BEFORE_TRANSIT.replace("ACCOUNTS\n", accounts)


def test_embedded_style_configs_pass_nats_server_test(tmp_path: Path):
    accounts = accounts_block(_users("pw", ("eu", "us"))["eu"], NatsLogin("leaf", "leafpw"), NatsLogin("sys", "syspw"))
    assert_valid(tmp_path, {
        "alone.conf": jetstream_server("js-local", -1, tmp_path / "alone", accounts),
        "js-eu.conf": jetstream_server("js-eu", -1, tmp_path / "eu", accounts, domain="eu",
                                       leaf_remote="nats-leaf://leaf:leafpw@127.0.0.1:7422"),
        "transit-eu.conf": transit_server("eu", 4223, 7422, 7222, accounts, [Peer("us", "nats://127.0.0.1:7223")],
                                          advertise="127.0.0.1:9999"),
    })


def _certificates(directory: Path) -> Tls:
    """A CA and one certificate for both ends (serverAuth and clientAuth), as the nodes use."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "grokstack test CA")])

    def certificate(subject: x509.Name, public_key, extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    ca = certificate(ca_name, ca_key.public_key(), [(x509.BasicConstraints(ca=True, path_length=None), True)])
    node = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")]), key.public_key(), [
        (x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
         False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "node.pem").write_bytes(node.public_bytes(pem))
    (directory / "node-key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption()))
    return Tls(str(directory / "node.pem"), str(directory / "node-key.pem"), str(directory / "ca.pem"))


def test_production_configs_pass_nats_server_test(tmp_path: Path):
    """Three regions with TLS everywhere, a gateway password, 3-node JetStream and 2-node transit
    clusters: every server config is accepted, TLS files loaded."""
    tls = _certificates(tmp_path)
    files = region_configs(EXAMPLE, _users("pw"), NatsLogin("leaf", "leaf/pw"), NatsLogin("sys", "syspw"),
                           gateway_login=NatsLogin("gateway", "gw@pw:1"), client_tls=tls, node_tls=tls,
                           store_dir=str(tmp_path / "store"))
    assert sorted(files) == sorted([accounts_file(r) for r in ("eu", "us", "ap")]
                                   + [f"js-{r}-{i}.conf" for r in ("eu", "us", "ap") for i in range(3)]
                                   + [f"transit-{r}-{i}.conf" for r in ("eu", "us", "ap") for i in range(2)])
    assert_valid(tmp_path, files)


def test_a_missing_certificate_fails_the_config_test(tmp_path: Path):
    """What the test above relies on: `nats-server -t` loads the TLS files."""
    tls = Tls(str(tmp_path / "absent.pem"), str(tmp_path / "absent-key.pem"), str(tmp_path / "absent-ca.pem"))
    accounts = accounts_block(_users("pw")["eu"], NatsLogin("leaf", "leafpw"), NatsLogin("sys", "syspw"))
    (tmp_path / "js.conf").write_text(jetstream_server("js", -1, tmp_path / "js", accounts, tls=tls))
    assert nats_server_test(tmp_path / "js.conf").returncode != 0


def test_tls_is_on_every_link_it_is_given_for():
    client = Tls("/c.pem", "/c-key.pem", "/c-ca.pem")
    node = Tls("/n.pem", "/n-key.pem", "/n-ca.pem", timeout_s=5)
    files = region_configs(EXAMPLE[:2], NO_USERS, NatsLogin("leaf", "l"), NatsLogin("sys", "s"),
                           client_tls=client, node_tls=node)
    served = client.block()
    assert served == ('tls { cert_file: "/c.pem", key_file: "/c-key.pem", ca_file: "/c-ca.pem", '
                      'verify: true, timeout: 2 }')
    dialing = 'tls { cert_file: "/n.pem", key_file: "/n-key.pem", ca_file: "/n-ca.pem", timeout: 5 }'
    accepting = dialing.replace(", timeout", ", verify: true, timeout")
    js, transit = files["js-eu-0.conf"], files["transit-eu-0.conf"]
    assert f"listen: 0.0.0.0:4222\n{served}\n" in js and f"listen: 0.0.0.0:4222\n{served}\n" in transit
    assert f'deny_exports: ["*.hb.>"], {dialing} }} ] }}' in js  # the leaf connection, dialed
    assert f"leafnodes {{ listen: 0.0.0.0:7422, {accepting} }}" in transit
    gateway = transit[transit.index("gateway {"):transit.index("}\ncluster")]
    assert f"  {accepting}\n" in gateway
    for text in (js, transit):  # routes
        cluster = text[text.index("cluster {"):]
        assert f"  {accepting}\n}}" in cluster[:cluster.index("\n}") + 2]
    plain = region_configs(EXAMPLE[:2], NO_USERS, NatsLogin("leaf", "l"), NatsLogin("sys", "s"))
    assert not any("tls" in text for text in plain.values())


def test_the_gateway_demands_and_gives_its_login():
    files = region_configs(EXAMPLE, NO_USERS, NatsLogin("leaf", "l"), NatsLogin("sys", "s"),
                           gateway_login=NatsLogin("gateway", "p@ss/w:rd"))
    transit = files["transit-eu-1.conf"]
    assert '  authorization { user: "gateway", password: "p@ss/w:rd" }\n' in transit
    assert ('gateways: [ { name: "transit-us", urls: ["nats://gateway:p%40ss%2Fw%3Ard@gateway.us.example.net:7222"] }, '
            '{ name: "transit-ap", urls: ["nats://gateway:p%40ss%2Fw%3Ard@gateway.ap.example.net:7222"] } ]') in transit
    assert '  advertise: "gateway.eu.example.net:7222"\n' in transit  # the LoadBalancer, not the pod
    without = region_configs(EXAMPLE, NO_USERS, NatsLogin("leaf", "l"), NatsLogin("sys", "s"))["transit-eu-1.conf"]
    assert "authorization" not in without and "nats://gateway.us.example.net:7222" in without


def test_each_region_is_its_own_jetstream_cluster_and_domain_leafing_to_its_transits():
    files = region_configs(EXAMPLE, NO_USERS, NatsLogin("leaf", "l"), NatsLogin("sys", "s"))
    js = files["js-us-2.conf"]
    assert js.startswith("# js-us-2, a node of region us's JetStream.\n")
    assert 'server_name: "js-us-2"\n' in js and 'domain: "us"' in js
    assert ('  name: "js-us"\n  listen: 0.0.0.0:6222\n  no_advertise: true\n  routes: ['
            + ", ".join(f'"nats://js-us-{i}.js-us.nats.svc.cluster.local:6222"' for i in range(3)) + "]\n") in js
    assert ('urls: ["nats-leaf://leaf:l@transit-us-0.transit-us.nats.svc.cluster.local:7422", '
            '"nats-leaf://leaf:l@transit-us-1.transit-us.nats.svc.cluster.local:7422"], account: APP') in js
    transit = files["transit-us-0.conf"]
    assert 'server_name: "transit-us-0"\n' in transit and '  name: "transit-us"\n' in transit  # gateway and cluster
    assert "jetstream" not in transit and "http_port: 8222\n" in js
    for text in (js, transit):
        assert text.endswith('include "accounts-us.conf"\n') and "password" not in text
    assert "accounts {" in files[accounts_file("us")] and "system_account: SYS" in files[accounts_file("us")]


def test_a_lone_node_has_no_cluster_and_names_must_be_distinct():
    alone = [RegionPlan(r, ("js",), ("transit",), f"gw.{r}:7222") for r in ("eu", "us")]
    logins = NatsLogin("leaf", "l"), NatsLogin("sys", "s")
    files = region_configs(alone, NO_USERS, *logins)
    assert not any("cluster {" in text for text in files.values())
    with pytest.raises(ValueError, match="distinct"):
        region_configs(alone + alone[:1], NO_USERS, *logins)
    with pytest.raises(ValueError, match="region"):
        region_configs([RegionPlan("e.u", ("js",), ("t",), "gw:7222")], NO_USERS, *logins)


def test_a_transit_cluster_is_named_after_its_gateway():
    """nats-server refuses other names at start (`nats-server -t` does not notice)."""
    with pytest.raises(ValueError, match="transit-eu"):
        transit_server("eu", 4222, 7422, 7222, "", [], cluster=Cluster("transits", 6222, ("nats://a:6222",)))


def test_the_examples_are_what_the_renderer_writes():
    written = {path.name: path.read_text() for path in EXAMPLES.glob("*.conf")}
    assert written == example_files(), "infra/nats/regions/ drifted: python -m tests.unit.test_nats_config"


if __name__ == "__main__":  # rewrite infra/nats/regions/*.conf from EXAMPLE
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    for stale in EXAMPLES.glob("*.conf"):
        stale.unlink()
    for name, text in example_files().items():
        (EXAMPLES / name).write_text(text)
    print(f"wrote {len(example_files())} files to {EXAMPLES}", file=sys.stderr)


def test_the_nats_config_command_writes_every_file_from_a_plan_with_the_role_logins(tmp_path: Path):
    """`grokstack nats-config` on the example plan: the files of the examples, private, with the
    logins of the credentials file (made once, kept) and valid for nats-server (no TLS here)."""
    from services.nats_auth import nats_config

    plan = tmp_path / "plan.json"
    data = json.loads((EXAMPLES / "plan.json").read_text())
    assert [r["region"] for r in data["regions"]] == [p.region for p in EXAMPLE]
    plan.write_text(json.dumps({"regions": data["regions"]}))
    credentials = tmp_path / "secrets" / "logins.json"
    written = nats_config(plan, "gs", credentials, tmp_path / "out")
    assert {p.name for p in written} == {p.name for p in EXAMPLES.glob("*.conf")}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in written)
    logins = load_logins(credentials)
    accounts = (tmp_path / "out" / "accounts-eu.conf").read_text()
    assert all(login.password in accounts for login in logins.values())
    assert "GS_CAPTURE_ap" in accounts  # rights on every region's streams: its own and the mirrors
    # eu's edges make the mirrors of us and ap, and may not touch eu's own capture stream
    assert "$JS.API.STREAM.DELETE.GS_CAPTURE_us" in accounts and "$JS.API.STREAM.CREATE.GS_CAPTURE_ap" in accounts
    assert not any(f"$JS.API.STREAM.{verb}.GS_CAPTURE_eu" in accounts for verb in ("CREATE", "UPDATE", "DELETE"))
    assert "$JS.API.STREAM.DELETE.GS_CAPTURE_eu" in (tmp_path / "out" / "accounts-us.conf").read_text()
    again = nats_config(plan, "gs", credentials, tmp_path / "again")
    assert (tmp_path / "again" / "accounts-eu.conf").read_text() == accounts and len(again) == len(written)
    loopback = tmp_path / "loopback.conf"  # the host names do not resolve here: the shape is what is checked
    loopback.write_text((tmp_path / "out" / "js-eu-0.conf").read_text().replace(".nats.svc.cluster.local", ""))
    (tmp_path / "accounts-eu.conf").write_text(accounts)
    result = nats_server_test(loopback)
    assert result.returncode == 0, result.stderr
