"""`grokstack nats-auth`: the nats-server `authorization` block for a production server, and the
role logins that go with it; `grokstack nats-config`: every server file of several regions.

    grokstack nats-auth --prefix gs --credentials secrets/nats-logins.json > authorization.conf
    grokstack nats-config --plan regions.json --credentials secrets/nats-logins.json --out nats/

nats-auth prints the block (include it in the server config, see infra/nats/secure.conf) and writes
the logins (mode 0600) for the machines: give each one the entries of the roles it runs, as its
GROKSTACK_NATS_CREDENTIALS. The passwords are new each run. `--client acme:billing` adds a login
for a back-end service bound to tenant `acme` and client id `billing` (`client:acme:billing`).

nats-config renders, from a plan of where each region's servers are (services/nats_config.py
RegionPlan, as JSON; infra/nats/regions/README.md), `accounts-<region>.conf` and a file per JetStream and
transit node, with the role logins of `--credentials` (made when the file does not exist yet) and
the servers' own (leaf, system account, gateways: `servers.json` beside it), all files private.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from bus.credentials import NatsLogin, client_login, generate_logins, load_logins, save_logins, write_private
from bus.permissions import authorization_block, edge_user_key, role_users
from bus.subjects import ANY, Subjects, check_token
from services.embedded import server_logins
from services.nats_config import LEAF_USER, SYSTEM_USER, RegionPlan, Tls, region_configs

GATEWAY_USER = "gateway"


def add_nats_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", action="append", default=[],
                        help="a subject prefix the server serves (repeat, e.g. the live one and a "
                             "sandbox; default gs; '*' for any, which widens JetStream rights to every stream)")
    parser.add_argument("--region", action="append", default=[],
                        help="a region whose streams the server holds (repeat: its own and the "
                             "regions it mirrors; default any, which widens JetStream rights to every stream)")
    parser.add_argument("--edge-id", action="append", default=[],
                        help="also a login `edge-<id>` for the edge whose GROKSTACK_WORKER_ID is <id>, "
                             "subscribing only to its own events (repeat); such an edge cannot adopt "
                             "another edge's requests live")
    parser.add_argument("--client", action="append", default=[], metavar="TENANT:CLIENT_ID",
                        help="also a login for a back-end service that submits jobs directly, bound to "
                             "one tenant and one client id (repeat): it may publish only that tenant's "
                             "requests and read only its own events")
    parser.add_argument("--credentials", required=True, type=Path,
                        help="the JSON file to write the logins to (mode 0600)")


def nats_auth(prefixes: list[str], edge_ids: list[str], credentials: Path,
              regions: list[str] | None = None, clients: list[str] | None = None) -> str:
    subjects = [Subjects.any_prefix() if p == ANY else Subjects(p) for p in prefixes or ["gs"]]
    scope = tuple(r if r == ANY else check_token(r, "region") for r in regions or [ANY])
    logins = generate_logins()
    for edge_id in edge_ids:
        password = generate_logins(("edge",))["edge"].password
        logins[edge_user_key(check_token(edge_id, "edge id"))] = NatsLogin(f"edge-{edge_id}", password)
    for client in clients or []:
        tenant, sep, client_id = client.partition(":")
        if not sep:
            raise ValueError(f"--client {client!r}: give TENANT:CLIENT_ID")
        key, login = client_login(tenant, client_id)
        logins[key] = login
    save_logins(credentials, logins)
    return authorization_block(role_users(
        {key: (login.user, login.password) for key, login in logins.items()}, subjects, scope))


def run_nats_auth(args: argparse.Namespace) -> int:
    try:
        print(nats_auth(args.prefix, args.edge_id, args.credentials, args.region, args.client), end="")
    except ValueError as exc:
        print(f"grokstack nats-auth: {exc}", file=sys.stderr)
        return 2
    return 0


def add_nats_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, type=Path,
                        help='JSON: {"regions": [{"region": "eu", "jetstream_hosts": [...], "transit_hosts": '
                             '[...], "gateway": "host:port"}, ...], "client_tls": {...}, "node_tls": {...}} '
                             "(tls objects: cert_file, key_file, ca_file; optional)")
    parser.add_argument("--prefix", default="gs", help="the subject prefix the servers serve")
    parser.add_argument("--credentials", required=True, type=Path,
                        help="the role logins (JSON, as nats-auth writes them); made when missing")
    parser.add_argument("--out", required=True, type=Path, help="the directory to write the files to")


def nats_config(plan_file: Path, prefix: str, credentials: Path, out: Path) -> list[Path]:
    plan = json.loads(plan_file.read_text())
    regions = [RegionPlan(r["region"], tuple(r["jetstream_hosts"]), tuple(r["transit_hosts"]), r["gateway"])
               for r in plan["regions"]]
    if credentials.exists():
        logins = load_logins(credentials)
    else:
        logins = generate_logins()
        save_logins(credentials, logins)
    servers = server_logins(credentials, (LEAF_USER, SYSTEM_USER, GATEWAY_USER))
    # Every server holds its own region's streams and mirrors of the others': rights on them all,
    # but an edge makes (and remakes) only the mirrors: never its own region's capture stream.
    names = tuple(r.region for r in regions)
    passwords = {key: (login.user, login.password) for key, login in logins.items()}
    users = {region: role_users(passwords, [Subjects(prefix)], names,
                                mirrored=tuple(other for other in names if other != region))
             for region in names}
    tls = {key: Tls(**plan[key]) if plan.get(key) else None for key in ("client_tls", "node_tls")}
    files = region_configs(regions, users, servers[LEAF_USER], servers[SYSTEM_USER],
                           gateway_login=servers[GATEWAY_USER], client_tls=tls["client_tls"],
                           node_tls=tls["node_tls"])
    written = []
    for name, text in files.items():
        write_private(out / name, text)  # every one holds a password
        written.append(out / name)
    return written


def run_nats_config(args: argparse.Namespace) -> int:
    try:
        written = nats_config(args.plan, args.prefix, args.credentials, args.out)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        print(f"grokstack nats-config: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0
