"""A fleet of simulated workers on one machine, for `grokstack bench --spike --engine sim`.

Its own embedded nats-server and Redis-compatible server, one edge process, and the workers:
many prefill and decode workers (the real PoolWorker, prefill and decode services, leases,
budgets and bus traffic) whose engines are SimEngines with vLLM's measured step times. The
workers of a role share one host process (asyncio; a simulated engine mostly sleeps), so the
client and the edge keep a core of their own.

`python -m services.lab.sim_cluster --role decode --count 16 --calibration FILE` is that host process;
it reads its settings from the environment like every other process of the stack.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from services.lab.sim_calibration import Calibration
from services.embedded import EmbeddedNats, EmbeddedRedis, free_port
from services.settings import Settings
from services.up import child_environment, stop_children

READY = "sim workers serving"
# No worker is killed in this drill, so the lease only costs CPU: renewals of hundreds of running
# jobs six times per lease, and idle polls as often, would take the core the simulation needs.
LEASE_S = 3.0
# One edge stands for the fleet's edges here. Its in-flight cap protects one edge process; left
# at one edge's default (256, as many as 16 decode workers' slots) it would refuse every priority
# alike once the slots are full, before the priority-aware admission saw any queue.
INFLIGHT_PER_DECODE_SLOT = 4


class SimCluster:
    def __init__(self, settings: Settings, workdir: Path, prefill_workers: int, decode_workers: int,
                 calibration_file: Path | None) -> None:
        self.settings = settings
        self.workdir = workdir
        self.sizes = {"prefill": prefill_workers, "decode": decode_workers}
        self.calibration_file = calibration_file
        self.nats = EmbeddedNats(workdir / "nats")
        self.redis = EmbeddedRedis(workdir / "redis", maxmemory="512mb")
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def edge_url(self) -> str:
        return f"ws://127.0.0.1:{self.settings.edge.edge_port}"

    @property
    def pids(self) -> list[int]:
        servers = [s.proc.pid for s in (self.nats, self.redis) if s.proc]
        return [p.pid for p in self.procs.values()] + servers

    def start(self, timeout: float = 120.0) -> None:
        nats_url = self.nats.start()
        self.settings = self.settings.replace(
            nats_url=nats_url, redis_url=self.redis.start(), nats_credentials=str(self.nats.credentials_file),
            edge_port=free_port(), api_port=free_port(), subject_prefix="spike", kv_key_prefix="spikekv",
            ack_wait_s=LEASE_S, log_format="json", log_level="warning", engine_step_lock="", cpu_nice=0,
            max_inflight_per_edge=max(self.settings.edge.max_inflight_per_edge, INFLIGHT_PER_DECODE_SLOT
                                      * self.sizes["decode"] * self.settings.engine.decode_slots))
        env = child_environment(self.settings)
        for role, count in self.sizes.items():
            args = ["--role", role, "--count", str(count)]
            if self.calibration_file:
                args += ["--calibration", str(self.calibration_file)]
            self._spawn(role, [sys.executable, "-m", "services.lab.sim_cluster", *args], env)
        self._spawn("edge", [sys.executable, "-m", "services.cli", "edge"], env)
        self._wait(timeout)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=open(self.workdir / f"{name}.log", "ab"),
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def _ready(self) -> bool:
        hosts = all(READY in (self.workdir / f"{role}.log").read_text(errors="replace") for role in self.sizes)
        if not hosts:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.settings.edge.edge_port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the simulated cluster did not start (exited: {dead}); logs in {self.workdir}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_children(self.procs, 20)
        self.redis.stop()
        self.nats.stop()


# ---------------------------------------------------------------------- the worker host process

async def host(settings: Settings, role: str, count: int, calibration: Calibration) -> None:
    """`count` workers of `role`, each with its own SimEngine, until SIGTERM."""
    from services.lab.sim_engine import SimEngine
    from kv_store.block_store import BlockStore
    from inference.pools import pool_named
    from services.processes import start_worker

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    slots = getattr(settings.engine, pool_named(role).slots_field)
    workers = []
    for i in range(count):
        engine = SimEngine(role, calibration, max_num_seqs=slots,  # as engine_args sets max_num_seqs
                           store=BlockStore(settings.kv.redis_url, settings.kv.kv_ttl_s),
                           key_prefix=settings.kv.kv_key_prefix, model_id=f"sim-{settings.served.model_id}",
                           max_model_len=settings.served.max_model_len)
        name = f"{settings.bus.worker_name}-{role}-{i + 1}"
        workers.append(await start_worker(settings.replace(worker_id=name), role, engine))
    print(f"{READY}: {count} {role} workers, {calibration.describe()}", flush=True)
    await stop.wait()
    await asyncio.gather(*(w.stop(settings.worker.drain_timeout_s) for w in workers))


def main(argv: list[str] | None = None) -> int:
    from services import logs
    from services.settings import from_env

    parser = argparse.ArgumentParser(description="host simulated workers of one role")
    parser.add_argument("--role", choices=["prefill", "decode"], required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--calibration", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = from_env()
    logs.configure("warning", settings.stack.log_format, process=f"sim-{args.role}")
    asyncio.run(host(settings, args.role, args.count, Calibration.load(args.calibration)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
