"""The processes of a region drill: several regions on one machine (services/regions.py: a
JetStream domain, a transit server, Redis and a WAN delay per region), and in each an edge and a
host of simulated prefill and decode workers (services/lab/sim_cluster.py: the real workers, bus
traffic, leases and KV hand-over, with engines that sleep vLLM's measured step times), each a
separate process. A region is killed whole (every process and server, SIGKILL), brought back, cut
off from the others (its transit paused) and healed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.lab.sim_calibration import calibration_file
from services.regions import RegionMesh
from services.provision import provision_now
from services.settings import ENV, Settings
from services.supervisor import StartFailed, Supervisor, child_environment
from services.embedded import free_port

START_TIMEOUT_S = 120.0
ROLES = ("prefill", "decode")


class RegionCluster:
    def __init__(self, settings: Settings, workdir: Path, regions: list[str], wan_delay_ms: float,
                 workers_per_role: int) -> None:
        self.settings = settings
        self.workdir = workdir
        self.regions = regions
        self.wan_delay_ms = wan_delay_ms
        self.workers_per_role = workers_per_role
        self.mesh = RegionMesh(workdir / "servers", regions, wan_delay_ms=wan_delay_ms, redis_maxmemory="256mb",
                               kv_key_prefix="drillkv")
        self.supervisor = Supervisor()
        self.regional: dict[str, Settings] = {}
        self.down: set[str] = set()  # killed, not back yet
        self.cut: set[str] = set()  # cut off from the others
        self.edge_metrics_ports: dict[str, int] = {}  # a region's edge comes back on the same one

    def edge_url(self, region: str) -> str:
        return f"ws://127.0.0.1:{self.regional[region].edge.edge_port}"

    def edge_metrics(self, region: str) -> str:
        return f"http://127.0.0.1:{self.edge_metrics_ports[region]}/metrics"

    def logs(self, region: str) -> Path:
        return self.workdir / region

    def start(self) -> None:
        self.supervisor.adopt("region servers", self.mesh.stop)
        self.mesh.start()
        for region in self.regions:
            servers = self.mesh[region]
            self.regional[region] = self.settings.replace(
                nats_url=servers.nats_url, nats_credentials=str(self.mesh.credentials_file),
                redis_url=servers.redis_url, region=region, worker_id=f"{region}-1", edge_port=free_port(),
                api_port=free_port(), subject_prefix="drill", kv_key_prefix="drillkv", log_format="json",
                log_level="info", engine_step_lock="", cpu_nice=0, ack_wait_s=3.0)
            self._start_processes(region)
        try:
            self.supervisor.wait_ready(START_TIMEOUT_S)
        except StartFailed as exc:
            raise SystemExit(f"the regions did not start: {exc}; logs in {self.workdir}") from None

    def _start_processes(self, region: str) -> None:
        s = self.regional[region]
        provision_now(s)  # idempotent: a region brought back keeps its streams
        env = child_environment(s)
        logs = self.logs(region)
        logs.mkdir(parents=True, exist_ok=True)
        calibration = calibration_file(self.settings.stack.data_dir)
        for role in ROLES:
            port = free_port()  # the host answers /readyz there once all its workers serve
            args = ["--role", role, "--count", str(self.workers_per_role)]
            if calibration.exists():
                args += ["--calibration", str(calibration)]
            self.supervisor.start(f"{region}-{role}", [sys.executable, "-m", "services.lab.sim_cluster", *args],
                                  env=env | {ENV["metrics_port"]: str(port)}, log=logs / f"{role}.log",
                                  ready_url=f"http://127.0.0.1:{port}/readyz", grace_s=10, append=True)
        metrics_port = self.edge_metrics_ports.setdefault(region, free_port())
        self.supervisor.start(f"{region}-edge", [sys.executable, "-m", "services.cli", "edge"],
                              env=env | {ENV["metrics_port"]: str(metrics_port)},
                              log=logs / "edge.log", grace_s=10, append=True,
                              ready_url=f"http://127.0.0.1:{s.edge.edge_port}/readyz")

    def kill(self, region: str) -> None:
        """Every process and server of the region, SIGKILL, at once."""
        for name in (f"{region}-edge", *(f"{region}-{role}" for role in ROLES)):
            self.supervisor.kill(name)
        self.mesh.kill(region)
        self.down.add(region)

    def restore(self, region: str) -> None:
        """The region's servers on their ports and data, then its processes (ready a moment later)."""
        self.mesh.restart(region)
        self._start_processes(region)
        self.down.discard(region)

    def isolate(self, region: str) -> None:
        self.mesh.isolate(region)
        self.cut.add(region)

    def rejoin(self, region: str) -> None:
        self.mesh.rejoin(region)
        self.cut.discard(region)

    def stop(self) -> None:
        for region in list(self.cut):
            self.rejoin(region)
        self.supervisor.stop_all()
