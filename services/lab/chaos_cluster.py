"""The processes a chaos drill runs and breaks: its own embedded servers, an edge, and workers,
each a separate process with its own log, killed for real and replaced as an orchestrator would."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from inference.model import ensure_bundled_model
from inference.profiles import resolve_profile
from services.embedded import EmbeddedNats, EmbeddedRedis, free_port
from services.settings import ENV, Settings
from services.up import child_environment, role_environment

DOWN_S = 1.0  # how long a killed server stays down before it is started again


class Cluster:
    def __init__(self, settings: Settings, workdir: Path, prefill_workers: int, decode_workers: int,
                 rng: random.Random, replace_after_s: float = 10.0) -> None:
        self.settings = settings
        self.workdir = workdir
        self.sizes = {"prefill": prefill_workers, "decode": decode_workers}
        self.rng = rng
        self.nats = EmbeddedNats(workdir / "nats")
        self.redis = EmbeddedRedis(workdir / "redis", maxmemory=settings.stack.redis_maxmemory)
        self.procs: dict[str, subprocess.Popen] = {}
        self._numbers = itertools.count(1)
        # A replacement comes this long after a kill, as a new pod is scheduled and started;
        # started at once here, its engine start would take the cores the survivors need.
        self.replace_after_s = replace_after_s
        self._replacements: list[threading.Timer] = []

    @property
    def edge_url(self) -> str:
        return f"ws://127.0.0.1:{self.settings.edge.edge_port}"

    # ------------------------------------------------------------------ start and stop

    def start(self) -> None:
        nats_url = self.nats.start()
        self.nats.port = int(nats_url.rsplit(":", 1)[1])  # restarts come back on the same port
        redis_url = self.redis.start()
        self.redis.port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        s = self.settings.replace(
            nats_url=nats_url, redis_url=redis_url, edge_port=free_port(), api_port=free_port(),
            nats_credentials=str(getattr(self.nats, "credentials_file", "") or ""),
            subject_prefix="chaos", kv_key_prefix="chaoskv", log_format="json")
        if s.uses_bundled_model:
            ensure_bundled_model(Path(s.served.model))
        if not s.engine.engine_step_lock and resolve_profile(s.engine).name == "cpu":
            s = s.replace(engine_step_lock=str((self.workdir / "engine-step.lock").resolve()))
        self.settings = s
        self.spawn("edge")
        for role, n in self.sizes.items():
            for _ in range(n):
                self.spawn(role)
        self._wait(lambda: all(self.ready(name) for name in list(self.procs)), 900, "the workers to start")
        self._wait(self._edge_ready, 60, "the edge to be ready")

    def stop(self) -> None:
        for timer in self._replacements:
            timer.cancel()
        for proc in list(self.procs.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.worker.drain_timeout_s + 15
        for proc in list(self.procs.values()):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(proc)
        self.redis.stop()
        self.nats.stop()

    # ------------------------------------------------------------------ processes

    def spawn(self, role: str) -> str:
        name = role if role == "edge" else f"{role}-{next(self._numbers)}"
        env = role_environment(child_environment(self.settings), self.settings, role)
        env[ENV["worker_id"]] = f"chaos-{name}"
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "services.cli", role], env=env,
            stdout=open(self.workdir / f"{name}.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        return name

    def ready(self, name: str) -> bool:
        if name == "edge":
            return self.procs[name].poll() is None
        log = self.workdir / f"{name}.log"
        return self.procs[name].poll() is None and log.exists() and "worker serving" in log.read_text(errors="replace")

    def _edge_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.settings.edge.api_port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            dead = [n for n, p in list(self.procs.items()) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise SystemExit(f"chaos: gave up waiting for {what} (exited: {dead}); logs in {self.workdir}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ faults

    def inject(self, kind: str) -> str:
        """Break one thing of `kind`; the name of what was broken, or "" when it may not be now."""
        if kind in ("decode", "prefill"):
            return self._kill_worker(kind)
        server = {"nats": self.nats, "redis": self.redis}[kind]
        server.proc.kill()  # as a crash: no goodbye to the clients, no final save
        server.proc.wait()
        time.sleep(DOWN_S)
        server.start()
        return f"{kind}-server, down {DOWN_S:.0f} s"

    def _kill_worker(self, role: str) -> str:
        alive = [n for n in list(self.procs) if n.startswith(role + "-") and self.ready(n)]
        # A decode worker dies only while a spare runs: the drill measures migration, not cold starts.
        if len(alive) < (2 if role == "decode" else 1):
            return ""
        victim = self.rng.choice(alive)
        _kill_group(self.procs.pop(victim))
        timer = threading.Timer(self.replace_after_s, self.spawn, [role])
        timer.daemon = True
        timer.start()
        self._replacements.append(timer)
        return f"{victim} SIGKILLed, a replacement starts in {self.replace_after_s:.0f} s"

    def migrated_requests(self) -> set[str]:
        """Request ids a decode worker continued after another one died (from their logs)."""
        found = set()
        for log in self.workdir.glob("decode-*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if "continuing a migrated job" in line:
                    try:
                        found.add(json.loads(line)["request_id"])
                    except (ValueError, KeyError):
                        pass
        return found


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
