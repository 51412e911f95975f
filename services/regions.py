"""The servers of several regions on one machine: for each region a JetStream server (its own
domain), a transit server it is a leaf node of, a Redis-compatible server, and, when distance is
asked for, a WAN delay proxy in front of its gateway (services/nats_config.py has the topology).

`grokstack up --regions`, the multi-region tests and the region drill start a `RegionMesh`; they
kill a whole region (`kill`), bring it back (`restart`), and cut it off from the others and heal
it (`isolate` / `rejoin`: its transit is paused, so its links stall as a cut WAN link does, and
what was in flight arrives late when it heals).
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import subprocess

from bus.subjects import check_token
from services.embedded import EmbeddedNats, EmbeddedRedis, EmbeddedTransit, free_port
from services.nats_config import Peer
from services.supervisor import kill_group, spawn, stop_group


@dataclass
class RegionServers:
    region: str
    nats: EmbeddedNats
    transit: EmbeddedTransit
    redis: EmbeddedRedis
    proxy_port: int  # where other regions reach its gateway (its own gateway port when no delay)
    proxy: subprocess.Popen | None = None
    redis_url: str = ""

    @property
    def nats_url(self) -> str:
        return self.nats.url

    def processes(self) -> list[subprocess.Popen]:
        return [p for p in (self.proxy, self.transit.proc, self.nats.proc, self.redis.proc) if p is not None]


class RegionMesh:
    def __init__(self, workdir: Path, regions: list[str], *, wan_delay_ms: float = 0.0,
                 redis_maxmemory: str = "512mb", prefixes: tuple[str, ...] = (), kv_key_prefix: str = "") -> None:
        if len(set(regions)) != len(regions) or not regions:
            raise ValueError(f"regions must be distinct names, got {regions!r}")
        self.workdir = workdir
        self.regions = [check_token(r, "region") for r in regions]
        self.wan_delay_ms = wan_delay_ms
        self.credentials_file = workdir / "credentials.json"  # one set of logins for every region
        gateway_ports = {r: free_port() for r in self.regions}
        public = {r: free_port() if wan_delay_ms else gateway_ports[r] for r in self.regions}
        self.servers: dict[str, RegionServers] = {}
        for region in self.regions:
            peers = tuple(Peer(r, f"nats://127.0.0.1:{public[r]}") for r in self.regions if r != region)
            transit = EmbeddedTransit(workdir / region / "transit", region, self.credentials_file, peers,
                                      ports=(free_port(), free_port(), gateway_ports[region]),
                                      advertise=f"127.0.0.1:{public[region]}" if wan_delay_ms else None)
            nats = EmbeddedNats(workdir / region / "nats", prefixes=prefixes, domain=region,
                                credentials_file=self.credentials_file)
            redis = EmbeddedRedis(workdir / region / "redis", maxmemory=redis_maxmemory, key_prefix=kv_key_prefix)
            self.servers[region] = RegionServers(region, nats, transit, redis, public[region])

    def __getitem__(self, region: str) -> RegionServers:
        return self.servers[region]

    def start(self) -> "RegionMesh":
        for region in self.regions:
            self.start_region(region)
        return self

    def start_region(self, region: str) -> RegionServers:
        servers = self.servers[region]
        if self.wan_delay_ms:
            (self.workdir / region).mkdir(parents=True, exist_ok=True)
            servers.proxy = spawn([sys.executable, "-m", "services.lab.wan_delay", "--listen",
                                   str(servers.proxy_port), "--to", str(servers.transit.gateway_port),
                                   "--delay-ms", str(self.wan_delay_ms)],
                                  log=self.workdir / region / "wan-delay.log", append=True)
        servers.transit.start()
        servers.nats.leaf_remote = servers.transit.leaf_url()
        servers.nats.start()
        servers.redis_url = servers.redis.start()
        return servers

    def kill(self, region: str) -> None:
        """SIGKILL every server of the region at once, as a lost datacenter."""
        servers = self.servers[region]
        for proc in servers.processes():
            kill_group(proc)
        servers.proxy = servers.transit.proc = servers.nats.proc = servers.redis.proc = None

    def restart(self, region: str) -> RegionServers:
        """The region's servers again on the same ports and data (its JetStream keeps what it held)."""
        servers = self.servers[region]
        servers.nats.port = int(servers.nats.url.rsplit(":", 1)[1]) if servers.nats.url else -1
        servers.redis.port = int(servers.redis_url.rsplit(":", 1)[1].split("/")[0]) if servers.redis_url else 0
        return self.start_region(region)

    def isolate(self, region: str) -> None:
        """Cut the region off: its transit stops (SIGSTOP), so nothing crosses in or out."""
        proc = self.servers[region].transit.proc
        if proc is not None:
            proc.send_signal(signal.SIGSTOP)

    def rejoin(self, region: str) -> None:
        proc = self.servers[region].transit.proc
        if proc is not None:
            proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for region in reversed(self.regions):
            servers = self.servers[region]
            self.rejoin(region)  # a stopped process cannot take its SIGTERM
            for proc in servers.processes():
                stop_group(proc, 5.0)
            servers.proxy = servers.transit.proc = servers.nats.proc = servers.redis.proc = None

    def __enter__(self) -> "RegionMesh":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
