"""The processes a chaos drill runs and breaks: its own embedded servers, an edge, and workers,
each a separate process with its own log, killed for real and replaced as an orchestrator would.

A process is ready when its health endpoint says so (a worker's /readyz on its metrics port, the
edge's /readyz), never from its log; the logs are read only for what happened (migrated answers).

A worker runs the real vLLM engine (`grokstack prefill|decode`), or with engine "sim" a simulated
one with vLLM's step times (services/lab/sim_cluster.py, one worker per process so that each can
be killed alone): the same workers, bus and stores, in a fraction of the memory and start time.
Simulated workers log warnings only, so the report counts no migrated answers from their logs.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import threading
import time
from pathlib import Path

from inference.model import ensure_bundled_model
from inference.profiles import resolve_profile
from services.embedded import EmbeddedNats, EmbeddedRedis, free_port
from services.lab.sim_calibration import calibration_file
from services.provision import provision_now
from services.settings import ENV, Settings
from services.supervisor import StartFailed, Supervisor, child_environment, kill_group
from services.up import role_environment

DOWN_S = 1.0  # how long a killed server stays down before it is started again
START_TIMEOUT_S = 900.0  # engines start in about a minute each; three start at once on 2 cores
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class Cluster:
    def __init__(self, settings: Settings, workdir: Path, prefill_workers: int, decode_workers: int,
                 rng: random.Random, replace_after_s: float = 10.0, engine: str = "vllm") -> None:
        self.settings = settings
        self.engine = engine  # "vllm" or "sim"
        self.workdir = workdir
        self.sizes = {"prefill": prefill_workers, "decode": decode_workers}
        self.rng = rng
        self.nats = EmbeddedNats(workdir / "nats")
        self.redis = EmbeddedRedis(workdir / "redis", maxmemory=settings.stack.redis_maxmemory, key_prefix="chaoskv")
        self.supervisor = Supervisor()
        self._numbers = itertools.count(1)
        # A replacement comes this long after a kill, as a new pod is scheduled and started;
        # started at once here, its engine start would take the cores the survivors need.
        self.replace_after_s = replace_after_s
        self._replacements: list[threading.Timer] = []
        self._lock = threading.Lock()  # replacements start from timer threads
        self._stopped = False

    @property
    def edge_url(self) -> str:
        return f"ws://127.0.0.1:{self.settings.edge.edge_port}"

    # ------------------------------------------------------------------ start and stop

    def start(self) -> None:
        self.supervisor.adopt("nats-server", self.nats.stop)
        nats_url = self.nats.start()
        self.nats.port = int(nats_url.rsplit(":", 1)[1])  # restarts come back on the same port
        self.supervisor.adopt("redis-server", self.redis.stop)
        redis_url = self.redis.start()
        self.redis.port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        # The report reads the decode workers' "continuing a migrated job" lines (info): their
        # logs keep info lines whatever --log-level the drill's own console was given.
        level = min(self.settings.stack.log_level, "info", key=LOG_LEVELS.index)
        s = self.settings.replace(
            nats_url=nats_url, redis_url=redis_url, edge_port=free_port(), api_port=free_port(),
            nats_credentials=str(getattr(self.nats, "credentials_file", "") or ""),
            subject_prefix="chaos", kv_key_prefix="chaoskv", log_format="json", log_level=level)
        if self.engine == "sim":  # no model to load, and no engine steps to take turns on the cores
            s = s.replace(engine_step_lock="", cpu_nice=0)
        elif s.uses_bundled_model:
            ensure_bundled_model(Path(s.served.model))
        if self.engine != "sim" and not s.engine.engine_step_lock and resolve_profile(s.engine).name == "cpu":
            s = s.replace(engine_step_lock=str((self.workdir / "engine-step.lock").resolve()))
        self.settings = s
        provision_now(s)
        self.spawn("edge")
        for role, n in self.sizes.items():
            for _ in range(n):
                self.spawn(role)
        try:
            self.supervisor.wait_ready(START_TIMEOUT_S)
        except StartFailed as exc:
            raise SystemExit(f"chaos: the stack did not start: {exc}; logs in {self.workdir}") from None

    def stop(self) -> None:
        """Everything, newest first: replacements due are cancelled, the processes stopped, then
        the servers."""
        with self._lock:
            self._stopped = True
            for timer in self._replacements:
                timer.cancel()
        self.supervisor.stop_all()

    # ------------------------------------------------------------------ processes

    def spawn(self, role: str) -> str:
        """Start a process of `role` (edge, prefill or decode) with a log of its own."""
        name = role if role == "edge" else f"{role}-{next(self._numbers)}"
        env = role_environment(child_environment(self.settings), self.settings, role)
        env[ENV["worker_id"]] = f"chaos-{name}"
        if role == "edge":
            ready = f"http://127.0.0.1:{self.settings.edge.api_port}/readyz"
        else:  # each worker answers /readyz on a port of its own
            port = free_port()
            env[ENV["metrics_port"]] = str(port)
            ready = f"http://127.0.0.1:{port}/readyz"
        command = [sys.executable, "-m", "services.cli", role]
        if role != "edge" and self.engine == "sim":
            command = [sys.executable, "-m", "services.lab.sim_cluster", "--role", role, "--count", "1"]
            calibration = calibration_file(self.settings.stack.data_dir)
            if calibration.exists():
                command += ["--calibration", str(calibration)]
        self.supervisor.start(name, command, env=env, log=self.workdir / f"{name}.log", ready_url=ready,
                              grace_s=self.settings.worker.drain_timeout_s + 15)
        return name

    def _replace(self, role: str) -> None:
        with self._lock:
            if not self._stopped:
                self.spawn(role)

    # ------------------------------------------------------------------ faults

    def inject(self, kind: str) -> tuple[str, float]:
        """Break one thing of `kind`: the name of what was broken ("" when it may not be now), and
        when (monotonic, just before the kill: asking who is ready and waiting for the dead to be
        reaped take seconds on a loaded machine, and a pause measured across the kill must not
        start before it)."""
        if kind in ("decode", "prefill"):
            return self._kill_worker(kind)
        server = {"nats": self.nats, "redis": self.redis}[kind]
        at = time.monotonic()
        kill_group(server.proc)  # as a crash: no goodbye to the clients, no final save
        time.sleep(DOWN_S)
        server.start()
        return f"{kind}-server, down {DOWN_S:.0f} s", at

    def _kill_worker(self, role: str) -> tuple[str, float]:
        alive = [c.name for c in self.supervisor.children() if c.name.startswith(role + "-") and c.ready()]
        # A decode worker dies only while a spare runs: the drill measures migration, not cold starts.
        if len(alive) < (2 if role == "decode" else 1):
            return "", 0.0
        victim = self.rng.choice(alive)
        at = time.monotonic()
        self.supervisor.kill(victim)
        timer = threading.Timer(self.replace_after_s, self._replace, [role])
        timer.daemon = True
        with self._lock:
            if self._stopped:
                return f"{victim} SIGKILLed", at
            timer.start()
            self._replacements.append(timer)
        return f"{victim} SIGKILLed, a replacement starts in {self.replace_after_s:.0f} s", at

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
