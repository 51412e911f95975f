"""nats-server configurations of the stack, as pure functions of names, ports and users: the
embedded servers (services/embedded.py) and `grokstack nats-config` (infra/nats/) write the same.

One region is one failure domain with its own JetStream domain; regions meet through a core-only
layer (../shared/designs/multi-region-nats.md, verified on nats-server 2.15):

      region eu                                      region us
  JetStream server, domain "eu"                JetStream server, domain "us"
  (edges, workers connect here)                (edges, workers connect here)
        | leaf node, account APP                     | leaf node, account APP
  transit-eu (core only) ======= gateway ======= transit-us (core only)

A region's JetStream has its own meta group, so losing another region cannot take its quorum (a
JetStream spanning regions answers 503 when a region dies). Token events, cancels, heartbeats and
request acks cross regions as core messages; stored data crosses only by asynchronous mirrors.

Every server has the same two accounts: APP (the stack's users, with JetStream) and SYS (the
system account, which a server with both leaf nodes and a gateway must have). The leaf
connection logs in to the transit as the APP user `leaf`.

Production (`region_configs`, infra/nats/regions/) adds what the one-machine servers go without,
each off when not given: TLS on client connections, leaf connections, gateways and routes; a
password on the gateway; and clusters, 3 JetStream nodes and a few transit nodes per region.
Every server includes the same accounts file, the one that holds the role users' passwords.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence
from urllib.parse import quote, urlsplit

from bus.credentials import NatsLogin
from bus.permissions import User
from bus.subjects import check_token

APP, SYS = "APP", "SYS"
LEAF_USER, SYSTEM_USER = "leaf", "sys"
REGION_LOCAL = ["*.hb.>"]  # subjects that never leave a region (any prefix's worker heartbeats)
def accounts_file(region: str) -> str:
    """The users of one region's servers: the same logins everywhere, but an edge may make mirrors
    only of the other regions' captures, so each region has its own file."""
    return f"accounts-{region}.conf"


@dataclass(frozen=True)
class Peer:
    """Another region's transit, as this one's gateway reaches it."""
    region: str
    url: str  # nats://host:port of its gateway (or of a WAN delay proxy in front of it)


@dataclass(frozen=True)
class Tls:
    """A `tls {}` block; files as the server sees them. Routes, leaf connections and gateways use
    one certificate both ways (a server dials as well as accepts), so it needs the serverAuth and
    clientAuth usages, and must name every host the other side dials."""
    cert_file: str
    key_file: str
    ca_file: str  # accepting: the CA of the other side's certificates; dialing: the server's CA
    verify: bool = True  # accepting: require a certificate of that CA (mutual TLS)
    timeout_s: float = 2.0  # the handshake's bound, as infra/nats/secure.conf: a few WAN round trips

    def block(self, *, dialing: bool = False) -> str:
        verify = "" if dialing else f", verify: {json.dumps(self.verify)}"  # the dialer is verified, not verifying
        return (f"tls {{ cert_file: {json.dumps(self.cert_file)}, key_file: {json.dumps(self.key_file)}, "
                f"ca_file: {json.dumps(self.ca_file)}{verify}, timeout: {self.timeout_s:g} }}")


@dataclass(frozen=True)
class Cluster:
    """The `cluster {}` block of one node of a region's JetStream (its meta group) or of its
    transit (whose cluster name must be its gateway name, `transit_name`)."""
    name: str
    port: int
    routes: tuple[str, ...]  # nats://host:port of every node; nats-server skips the route to itself
    tls: Tls | None = None

    def block(self, host: str) -> str:
        tls = f"  {self.tls.block()}\n" if self.tls else ""
        # Clients reach the nodes by the region's service name (NATS_URL), which the certificate
        # names; gossiped pod addresses would fail the TLS host check, so none is advertised.
        return (f"cluster {{\n"
                f"  name: {json.dumps(self.name)}\n"
                f"  listen: {host}:{self.port}\n"
                f"  no_advertise: true\n"
                f"  routes: {json.dumps(list(self.routes))}\n"
                f"{tls}"
                f"}}\n")


def transit_name(region: str) -> str:
    return f"transit-{region}"


def include(path: str) -> str:
    """In place of the accounts block: every server includes the one file that holds the
    passwords (its path is relative to the including file)."""
    return f"include {json.dumps(path)}\n"


def accounts_block(users: Iterable[User], leaf: NatsLogin, system: NatsLogin) -> str:
    """APP with the role users (each with its permissions, bus/permissions.py) and the leaf
    login, JetStream on; SYS with one user. Strings are JSON-quoted, which nats-server reads as is
    (and which keeps `$JS...` from being read as a variable)."""
    entries = [{"user": u.name, "password": u.password, "permissions": u.permissions.as_config()}
               for u in users]
    entries.append({"user": leaf.user, "password": leaf.password})
    app_users = ",\n".join("      " + json.dumps(e) for e in entries)
    system_user = json.dumps({"user": system.user, "password": system.password})
    return (f"accounts {{\n"
            f"  {APP}: {{\n    jetstream: enabled\n    users: [\n{app_users}\n    ]\n  }}\n"
            f"  {SYS}: {{ users: [ {system_user} ] }}\n"
            f"}}\n"
            f"system_account: {SYS}\n")


def _head(name: str, host: str, port: int, max_payload_mb: int, tls: Tls | None, http_port: int | None) -> str:
    """What every server starts with: name, client port (with its TLS), payload limit, monitoring."""
    return (f"server_name: {json.dumps(name)}\n"
            f"listen: {host}:{port}\n"
            + (f"{tls.block()}\n" if tls else "")
            + f"max_payload: {max_payload_mb}MB\n"
            + (f"http_port: {http_port}\n" if http_port is not None else ""))


def jetstream_server(name: str, port: int, store_dir: Path | str, accounts: str, *, domain: str | None = None,
                     leaf_remote: str | Sequence[str] | None = None, max_payload_mb: int = 8,
                     host: str = "127.0.0.1", tls: Tls | None = None, leaf_tls: Tls | None = None,
                     cluster: Cluster | None = None, http_port: int | None = None) -> str:
    """A region's JetStream server (or the only server of a one-region stack: no domain, no
    leaf). `leaf_remote`: nats-leaf://leaf:<password>@host:port of its transit (a list: of each
    node of its transit cluster). `tls`: on client connections; `leaf_tls`: the certificate it
    shows its transit and the CA it checks the transit's against; `cluster`: one node of the
    region's JetStream cluster (a meta group of its own per region); `http_port`: monitoring,
    which KEDA's JetStream scaler reads (no authentication: keep it inside the cluster)."""
    domain_line = f'domain: "{domain}", ' if domain else ""
    # Worker heartbeats stay in their region: its edges sum them up in region beats for the others.
    local = json.dumps(REGION_LOCAL)
    urls = [leaf_remote] if isinstance(leaf_remote, str) else list(leaf_remote or [])
    secured = f", {leaf_tls.block(dialing=True)}" if leaf_tls else ""
    leaf = (f'leafnodes {{ remotes: [ {{ urls: {json.dumps(urls)}, account: {APP}, '
            f'deny_imports: {local}, deny_exports: {local}{secured} }} ] }}\n' if urls else "")
    return (_head(name, host, port, max_payload_mb, tls, http_port)
            + f'jetstream {{ {domain_line}store_dir: {json.dumps(str(store_dir))}, max_file_store: 64GB, '
            f"max_memory_store: 512MB }}\n"
            + (cluster.block(host) if cluster else "")
            + f"{leaf}{accounts}")


def transit_server(region: str, port: int, leaf_port: int, gateway_port: int, accounts: str,
                   peers: Iterable[Peer], advertise: str | None = None, max_payload_mb: int = 8, *,
                   server_name: str | None = None, host: str = "127.0.0.1", tls: Tls | None = None,
                   leaf_tls: Tls | None = None, gateway_tls: Tls | None = None,
                   gateway_login: NatsLogin | None = None, cluster: Cluster | None = None,
                   http_port: int | None = None) -> str:
    """A region's core-only hub: its JetStream server joins as a leaf node; the other regions'
    transits are gateways. `advertise`: host:port where peers reach this gateway (a proxy, a
    LoadBalancer), when not its own port. `server_name`: one node's of a transit `cluster`
    (default: the gateway's name). `gateway_login`: the user and password every region's
    gateway demands and gives (the same login everywhere); `tls`, `leaf_tls`, `gateway_tls`: on
    its client port, leaf port and gateway."""
    gateway = transit_name(region)
    if cluster and cluster.name != gateway:
        raise ValueError(f"a transit's cluster is named after its gateway: {gateway!r}, not {cluster.name!r}")
    urls = {transit_name(p.region): _with_login(p.url, gateway_login) for p in peers}
    gateways = ", ".join(f'{{ name: "{name}", urls: [{json.dumps(url)}] }}' for name, url in urls.items())
    advertised = f'  advertise: "{advertise}"\n' if advertise else ""
    authorization = (f"  authorization {{ user: {json.dumps(gateway_login.user)}, "
                     f"password: {json.dumps(gateway_login.password)} }}\n" if gateway_login else "")
    secured = f"  {gateway_tls.block()}\n" if gateway_tls else ""  # also what it dials peers with
    leaf_secured = f", {leaf_tls.block()}" if leaf_tls else ""
    return (_head(server_name or gateway, host, port, max_payload_mb, tls, http_port)
            + f"gateway {{\n"
            f'  name: "{gateway}"\n'
            f"  listen: {host}:{gateway_port}\n"
            f"{advertised}{authorization}{secured}"
            f"  gateways: [ {gateways} ]\n"
            f"}}\n"
            + (cluster.block(host) if cluster else "")
            + f"leafnodes {{ listen: {host}:{leaf_port}{leaf_secured} }}\n"
            f"{accounts}")


def _with_login(url: str, login: NatsLogin | None) -> str:
    """nats://host:port -> nats://user:password@host:port (quoted, so any password fits a URL)."""
    if login is None:
        return url
    parts = urlsplit(url)
    userinfo = f"{quote(login.user, safe='')}:{quote(login.password, safe='')}"
    return parts._replace(netloc=f"{userinfo}@{parts.netloc}").geturl()


@dataclass(frozen=True)
class Ports:
    """The standard NATS ports, the same on every node (each has a host of its own)."""
    client: int = 4222
    cluster: int = 6222
    gateway: int = 7222
    leaf: int = 7422
    http: int = 8222


@dataclass(frozen=True)
class RegionPlan:
    """Where one region's servers are, as the others reach them. Nodes are named
    `js-<region>-<i>` and `transit-<region>-<i>` (a StatefulSet of that name has pods of those
    names), and so are their config files."""
    region: str
    jetstream_hosts: tuple[str, ...]  # one per JetStream node (3 in production), as the others dial it
    transit_hosts: tuple[str, ...]  # one per transit node, as the JetStream nodes dial it
    gateway: str  # host:port where other regions' transits reach this one's (a LoadBalancer)


def region_configs(regions: Sequence[RegionPlan], users: Mapping[str, Iterable[User]], leaf: NatsLogin,
                   system: NatsLogin, *,
                   gateway_login: NatsLogin | None = None, client_tls: Tls | None = None,
                   node_tls: Tls | None = None, ports: Ports = Ports(), host: str = "0.0.0.0",
                   store_dir: str = "/var/lib/nats/jetstream", max_payload_mb: int = 8) -> dict[str, str]:
    """Every file of a deployment of several regions: `accounts-<region>.conf` (the users of that
    region's servers, `users[region]`; private) and `<server name>.conf` for each node of each region's
    JetStream and transit. `client_tls`: the
    certificate of the client ports; `node_tls`: the one servers show each other on routes,
    leaf connections and gateways (one CA for every region: gateways check each other's). The
    JetStream and transit files hold the leaf (and gateway) password too: keep them private."""
    names = [check_token(plan.region, "region") for plan in regions]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"regions must be distinct names, got {names!r}")
    files: dict[str, str] = {}
    for plan in regions:
        name = accounts_file(plan.region)
        note = f"{name}: the users of region {plan.region}'s servers (passwords: keep private)"
        files[name] = _header(note) + accounts_block(users[plan.region], leaf, system)
    for plan in regions:
        accounts = include(accounts_file(plan.region))
        js_cluster = _cluster(f"js-{plan.region}", plan.jetstream_hosts, ports.cluster, node_tls)
        leaf_urls = [_with_login(f"nats-leaf://{h}:{ports.leaf}", leaf) for h in plan.transit_hosts]
        for i in range(len(plan.jetstream_hosts)):
            name = f"js-{plan.region}-{i}"
            files[f"{name}.conf"] = _header(f"{name}, a node of region {plan.region}'s JetStream") + jetstream_server(
                name, ports.client, store_dir, accounts, domain=plan.region, leaf_remote=leaf_urls,
                max_payload_mb=max_payload_mb, host=host, tls=client_tls, leaf_tls=node_tls,
                cluster=js_cluster, http_port=ports.http)
        peers = [Peer(other.region, f"nats://{other.gateway}") for other in regions if other.region != plan.region]
        transit_cluster = _cluster(transit_name(plan.region), plan.transit_hosts, ports.cluster, node_tls)
        for i in range(len(plan.transit_hosts)):
            name = f"{transit_name(plan.region)}-{i}"
            # Every node advertises the region's LoadBalancer: its pod address is not reachable
            # from the other clusters, and any node of the transit will do for a peer.
            files[f"{name}.conf"] = _header(f"{name}, a node of region {plan.region}'s transit") + transit_server(
                plan.region, ports.client, ports.leaf, ports.gateway, accounts, peers, plan.gateway,
                max_payload_mb, server_name=name, host=host, tls=client_tls, leaf_tls=node_tls,
                gateway_tls=node_tls, gateway_login=gateway_login, cluster=transit_cluster, http_port=ports.http)
    return files


def _header(what: str) -> str:
    return f"# {what}.\n# Rendered by services/nats_config.py region_configs: change the plan, render again.\n"


def _cluster(name: str, hosts: Sequence[str], port: int, tls: Tls | None) -> Cluster | None:
    """A cluster block for a group of several nodes; a lone node has none."""
    return Cluster(name, port, tuple(f"nats://{h}:{port}" for h in hosts), tls) if len(hosts) > 1 else None
