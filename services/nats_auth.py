"""`grokstack nats-auth`: the nats-server `authorization` block for a production server, and the
role logins that go with it.

    grokstack nats-auth --prefix gs --credentials secrets/nats-logins.json > authorization.conf

Prints the block (include it in the server config, see infra/nats/secure.conf) and writes the
logins (mode 0600) for the machines: give each one the entries of the roles it runs, as its
GROKSTACK_NATS_CREDENTIALS. The passwords are new each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bus.credentials import NatsLogin, generate_logins, save_logins
from bus.permissions import authorization_block, edge_user_key, role_users
from bus.subjects import ANY, Subjects, check_token


def add_nats_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", action="append", default=[],
                        help="a subject prefix the server serves (repeat, e.g. the live one and a "
                             "sandbox; default gs; '*' for any, which widens JetStream rights to every stream)")
    parser.add_argument("--edge-id", action="append", default=[],
                        help="also a login `edge-<id>` for the edge whose GROKSTACK_WORKER_ID is <id>, "
                             "subscribing only to its own events (repeat); such an edge cannot adopt "
                             "another edge's requests live")
    parser.add_argument("--credentials", required=True, type=Path,
                        help="the JSON file to write the logins to (mode 0600)")


def nats_auth(prefixes: list[str], edge_ids: list[str], credentials: Path) -> str:
    subjects = [Subjects.any_prefix() if p == ANY else Subjects(p) for p in prefixes or ["gs"]]
    logins = generate_logins()
    for edge_id in edge_ids:
        password = generate_logins(("edge",))["edge"].password
        logins[edge_user_key(check_token(edge_id, "edge id"))] = NatsLogin(f"edge-{edge_id}", password)
    save_logins(credentials, logins)
    return authorization_block(role_users(
        {key: (login.user, login.password) for key, login in logins.items()}, subjects))


def run_nats_auth(args: argparse.Namespace) -> int:
    try:
        print(nats_auth(args.prefix, args.edge_id, args.credentials), end="")
    except ValueError as exc:
        print(f"grokstack nats-auth: {exc}", file=sys.stderr)
        return 2
    return 0
