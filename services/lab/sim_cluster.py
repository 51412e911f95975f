"""A fleet of simulated workers on one machine, for `grokstack bench --spike --engine sim`.

Its own embedded nats-server and Redis-compatible server, one edge process, and the workers:
many prefill and decode workers (the real PoolWorker, prefill and decode services, leases,
budgets and bus traffic) whose engines are SimEngines with vLLM's measured step times. The
workers of a role share one host process (asyncio; a simulated engine mostly sleeps), so the
client and the edge keep a core of their own.

`python -m services.lab.sim_cluster --role decode --count 16 --calibration FILE` is that host process;
it reads its settings from the environment like every other process of the stack, and answers
/readyz on its metrics port (GROKSTACK_METRICS_PORT) once all its workers are ready, which is how
the cluster knows it has started.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from services.lab.sim_calibration import Calibration
from services.embedded import EmbeddedNats, EmbeddedRedis, free_port
from services.provision import provision_now
from services.settings import ENV, Settings
from services.supervisor import StartFailed, Supervisor, child_environment

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
        self.redis = EmbeddedRedis(workdir / "redis", maxmemory="512mb", key_prefix="spikekv")
        self.supervisor = Supervisor()

    @property
    def edge_url(self) -> str:
        return f"ws://127.0.0.1:{self.settings.edge.edge_port}"

    def processes(self) -> dict[str, int]:
        """Its processes by name: the host of each role's workers, the edge and the servers."""
        hosts = {f"{c.name} host" if c.name in self.sizes else c.name: c.pid for c in self.supervisor.children()}
        servers = {name: s.proc.pid for name, s in (("nats", self.nats), ("redis", self.redis)) if s.proc}
        return hosts | servers

    def start(self, timeout: float = 120.0) -> None:
        try:
            self._start(timeout)
        except StartFailed as exc:
            self.stop()
            raise SystemExit(f"the simulated cluster did not start: {exc}; logs in {self.workdir}") from None
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        self.supervisor.adopt("nats-server", self.nats.stop)
        nats_url = self.nats.start()
        self.supervisor.adopt("redis-server", self.redis.stop)
        self.settings = self.settings.replace(
            nats_url=nats_url, redis_url=self.redis.start(), nats_credentials=str(self.nats.credentials_file),
            edge_port=free_port(), api_port=free_port(), subject_prefix="spike", kv_key_prefix="spikekv",
            ack_wait_s=LEASE_S, log_format="json", log_level="warning", engine_step_lock="", cpu_nice=0,
            max_inflight_per_edge=max(self.settings.edge.max_inflight_per_edge, INFLIGHT_PER_DECODE_SLOT
                                      * self.sizes["decode"] * self.settings.engine.decode_slots))
        provision_now(self.settings)
        env = child_environment(self.settings)
        for role, count in self.sizes.items():
            args = ["--role", role, "--count", str(count)]
            if self.calibration_file:
                args += ["--calibration", str(self.calibration_file)]
            port = free_port()  # the host answers /readyz there once all its workers serve
            self.supervisor.start(role, [sys.executable, "-m", "services.lab.sim_cluster", *args],
                                  env=env | {ENV["metrics_port"]: str(port)}, log=self.workdir / f"{role}.log",
                                  ready_url=f"http://127.0.0.1:{port}/readyz", grace_s=20)
        self.edge_metrics_port = free_port()
        self.supervisor.start("edge", [sys.executable, "-m", "services.cli", "edge"],
                              env=env | {ENV["metrics_port"]: str(self.edge_metrics_port)},
                              log=self.workdir / "edge.log", grace_s=20,
                              ready_url=f"http://127.0.0.1:{self.settings.edge.edge_port}/readyz")
        self.supervisor.wait_ready(timeout)

    def stop(self) -> None:
        self.supervisor.stop_all()


# ---------------------------------------------------------------------- the worker host process

async def host(settings: Settings, role: str, count: int, calibration: Calibration) -> None:
    """`count` workers of `role`, each with its own SimEngine, until SIGTERM. The process answers
    /readyz on its metrics port when every one of its workers is ready."""
    from services.lab.sim_engine import SimEngine
    from kv_store.block_store import BlockStore
    from inference.pools import pool_named
    from services import telemetry
    from services.processes import serve_endpoints, start_worker

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
        # each worker's own endpoints on a free port; the host's, for them all, on the given one
        workers.append(await start_worker(settings.replace(worker_id=name, metrics_port=0), role, engine))
    port = serve_endpoints(settings, workers)
    print(f"sim workers serving: {count} {role} workers, {calibration.describe()}", flush=True)
    await stop.wait()
    await asyncio.gather(*(w.stop(settings.worker.drain_timeout_s) for w in workers))
    telemetry.stop_serving(port)


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
