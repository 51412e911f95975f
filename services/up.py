"""`grokstack up`: the whole stack on one machine, as separate processes, stopped cleanly.

Starts an embedded nats-server and Redis-compatible server unless NATS_URL / REDIS_URL name
existing ones, prepares the bundled model once, then runs one prefill worker, one decode
worker and one edge node, each its own process (as they would be on many machines); with
serving_mode=aggregated, one aggregated worker (prefill and decode in one engine) and the edge.

With `--regions eu,us` (any list), each region gets its own servers (a JetStream domain, a transit
server, a Redis-compatible server: services/regions.py, with `--wan-delay-ms` between regions), an
edge and one aggregated worker: several disaggregated pairs would be too many engines for one
machine's cores.

The streams of each region are provisioned (services/provision.py) after its servers start and
before any of its processes. Each process binds its own metrics port (a free one unless
GROKSTACK_METRICS_PORT is set: then that port, the next, ...) and reports it in its ports file
(GROKSTACK_PORTS_FILE, in <data_dir>/ports): `up` waits for the workers' reports before it
asks their /readyz, so no port is picked here for a child to find taken. A process that exits
is started again after a backoff (services/supervisor.py Restarter) while the rest keeps serving;
SIGINT or SIGTERM stops everything.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import structlog

from services import telemetry

from bus.roles import Role
from bus.section import redact_url
from inference.model import ensure_bundled_model
from inference.profiles import resolve_profile
from services.embedded import EmbeddedNats, EmbeddedRedis, free_port
from services.provision import provision_now
from services.regions import RegionMesh
from services.settings import ENV, Settings
from services.supervisor import (POLL_S, Backoff, Child, Restarter, StartFailed, Stopped, Supervisor, child_environment,
                                 local_url, stop_on_signals)

__all__ = ["StackWatch", "await_reports", "metrics_ports", "role_environment", "run_up"]

log = structlog.get_logger("grokstack.up")

SERVING_ROLES = {"disaggregated": (Role.PREFILL, Role.DECODE, Role.EDGE), "aggregated": (Role.AGGREGATED, Role.EDGE)}
START_TIMEOUT_S = 900.0  # engines load in about a minute here; a cold cache or a big model takes longer
REPORT_TIMEOUT_S = 120.0  # a worker binds its metrics port before its engine starts: seconds, not minutes

UP_LINE = "grokstack is up"  # printed once every process is ready (lab commands wait for it)


def role_environment(env: dict[str, str], settings: Settings, role: str) -> dict[str, str]:
    """On a shared CPU, decode yields the cores to prefill (see EngineConfig.cpu_nice), unless
    it computes the short prompts itself (EngineConfig.decode_prefill_max_tokens): then the
    prompts it would slow are its own, and a lower priority only lets every other process of the
    machine (edge, bus, clients) interrupt its passes."""
    engine = settings.engine
    if (role == Role.DECODE and engine.engine_step_lock and engine.cpu_nice == 0
            and engine.prompts_in_decode_up_to == 0):
        return {**env, ENV["cpu_nice"]: "5"}
    return env


def metrics_ports(settings: Settings, roles: tuple[str, ...]) -> dict[str, int]:
    """The metrics port each process is told to bind: metrics_port, metrics_port+1, ... when it
    is set; else 0, and each binds a free one and reports it (no port is picked here in advance:
    another process could take it before the child binds it)."""
    first = settings.worker.metrics_port
    return {role: first + i if first else 0 for i, role in enumerate(roles)}


def metrics_urls(settings: Settings, ports: dict[str, int]) -> str:
    return "\n                       ".join(f"http://{settings.edge.edge_host}:{port}/metrics ({role})"
                                         for role, port in ports.items())


def ports_file(settings: Settings, name: str) -> Path:
    return (settings.stack.data_dir / "ports" / f"{name}.json").resolve()


def reported_metrics_port(child: Child) -> int | None:
    """The metrics port the child reported in its ports file, if it did yet."""
    path = (child.env or {}).get(ENV["ports_file"])
    ports = telemetry.read_ports(path) if path else None
    return ports.get("metrics_port") if ports else None


def forget_report(child: Child) -> None:
    """Before it starts (again): a report of its last run must not be taken for the new one's."""
    path = (child.env or {}).get(ENV["ports_file"])
    if path:
        Path(path).unlink(missing_ok=True)


def await_reports(supervisor: Supervisor, names: list[str], timeout_s: float = REPORT_TIMEOUT_S) -> dict[str, int]:
    """Until every child named reported its metrics port; then its /readyz is on that port.
    Raises StartFailed when one of them exits first, or when time is up."""
    deadline = time.monotonic() + timeout_s
    ports: dict[str, int] = {}
    while True:
        for child in supervisor.exited():
            raise StartFailed(child.exit_message("while starting"))
        for name in names:
            if name not in ports and (port := reported_metrics_port(supervisor[name])) is not None:
                ports[name] = port
                supervisor[name].ready_url = local_url(_host(supervisor[name]), port, "/readyz")
        if len(ports) == len(names):
            return ports
        if time.monotonic() > deadline:
            raise StartFailed(f"no metrics port reported after {timeout_s:.0f} s by: "
                              + ", ".join(n for n in names if n not in ports))
        time.sleep(POLL_S)


def _host(child: Child) -> str:
    return (child.env or {}).get(ENV["edge_host"], "127.0.0.1")


def stack_memory_gib(root_pids: list[int]) -> float:
    total = 0
    for pid in root_pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 1024**3


def ready_url(settings: Settings, role: str) -> str | None:
    """Where a process of the stack says it serves: a worker's /readyz on its metrics port (its
    engine has started and it pulls work: known once it reported the port, see `await_reports`),
    the edge's on its websocket port (a prefill and a decode worker, or an aggregated one, sent a
    heartbeat)."""
    return local_url(settings.edge.edge_host, settings.edge.edge_port, "/readyz") if role == Role.EDGE else None


def run_up(settings: Settings) -> int:
    """Until SIGINT or SIGTERM (0; a process that exits meanwhile is started again), or a start
    that fails (1); then everything it started is stopped, newest first."""
    with stop_on_signals():
        try:
            with Supervisor() as supervisor:
                return _serve(settings, supervisor)
        except Stopped:
            return 0
        except StartFailed as exc:
            log.error("the stack did not start", reason=str(exc))
            return 1
        finally:
            log.info("stack stopped")


def _serve(settings: Settings, supervisor: Supervisor) -> int:
    if settings.stack.regions:
        return _serve_regions(settings, supervisor)
    return _serve_one(settings, supervisor)


def _serve_regions(settings: Settings, supervisor: Supervisor) -> int:
    """Every region's servers, edge and worker; say where each is; watch them."""
    names = settings.stack.regions.split(",")
    mesh = RegionMesh(settings.stack.data_dir / "regions", names, wan_delay_ms=settings.stack.wan_delay_ms,
                      redis_maxmemory=settings.stack.redis_maxmemory, kv_key_prefix=settings.kv.kv_key_prefix)
    supervisor.adopt("region servers", mesh.stop)
    mesh.start()
    if settings.uses_bundled_model:
        ensure_bundled_model(Path(settings.served.model))
    settings = settings.replace(serving_mode="aggregated")
    if not settings.engine.engine_step_lock and resolve_profile(settings.engine).name == "cpu":
        # the regions' engines share this machine's cores: let them take turns (kv_store/step_lock.py)
        settings = settings.replace(engine_step_lock=str((settings.stack.data_dir / "engine-step.lock").resolve()))
    regional: dict[str, Settings] = {}
    workers: list[str] = []
    for n, region in enumerate(names):
        servers = mesh[region]
        # The edges' ports follow the configured ones (8765, 8766, ...; 8000, 8001, ...), as one
        # region's edge takes the configured port: none is picked free here and bound later, which
        # another process could take in between. Port 0 still means any free one.
        edge_port, api_port = (port + n if port else free_port() for port in (settings.edge.edge_port,
                                                                               settings.edge.api_port))
        s = settings.replace(nats_url=servers.nats_url, nats_credentials=str(mesh.credentials_file.resolve()),
                             redis_url=servers.redis_url, region=region, worker_id=f"{region}-1",
                             edge_port=edge_port, api_port=api_port, metrics_port=0)
        _provision(s)
        workers += _start_processes(s, supervisor, prefix=f"{region}-")
        regional[region] = s
        log.info("region started", region=region, nats=s.bus.nats_url)
    await_reports(supervisor, workers)
    log.info("starting workers (the engines take about a minute to load)")
    supervisor.wait_ready(START_TIMEOUT_S)
    cli = os.path.relpath(Path(sys.executable).parent / "grokstack")
    lines = [f"\n{UP_LINE} in {len(names)} regions ({settings.stack.wan_delay_ms:g} ms one way between "
             f"them; one aggregated worker each, real engines):"]
    for region, s in regional.items():
        edge = s.edge
        url = f"ws://{edge.edge_host}:{edge.edge_port}"
        lines.append(f"  {region}: chat page http://{edge.edge_host}:{edge.edge_port}/   websocket {url}   "
                     f"OpenAI http://{edge.edge_host}:{edge.api_port}/v1   NATS {s.bus.nats_url}")
    first = regional[names[0]].edge
    others = ",".join(f"ws://{s.edge.edge_host}:{s.edge.edge_port}" for s in regional.values())
    lines.append(f"  chat that fails over between regions: {cli} chat "
                 + " ".join(f"--url ws://{s.edge.edge_host}:{s.edge.edge_port}" for s in regional.values()))
    lines.append(f"  chat page over every region: http://{first.edge_host}:{first.edge_port}/?edges={others}")
    lines.append("  Ctrl-C stops everything.\n")
    print("\n".join(lines), flush=True)
    return _watch(supervisor, set(workers))


def _provision(settings: Settings) -> None:
    """The region's streams, before any process of it starts (they may not create them)."""
    try:
        provision_now(settings)
    except Exception as exc:
        raise StartFailed(f"cannot provision the streams of region {settings.bus.region}: "
                          f"{type(exc).__name__}: {exc}") from None


def _start_processes(settings: Settings, supervisor: Supervisor, prefix: str = "") -> list[str]:
    """The serving mode's workers and the edge, each its own process; the workers' names."""
    roles = SERVING_ROLES[settings.stack.serving_mode]
    env = child_environment(settings)
    ports = metrics_ports(settings, roles)
    workers = []
    for role in roles:
        name = f"{prefix}{role}"
        report = ports_file(settings, name)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.unlink(missing_ok=True)
        role_env = {**role_environment(env, settings, role), ENV["metrics_port"]: str(ports[role]),
                    ENV["ports_file"]: str(report)}
        # Their output goes to this console, as a one-machine stack's should.
        supervisor.start(name, [sys.executable, "-m", "services.cli", str(role)], env=role_env,
                         ready_url=ready_url(settings, role), grace_s=settings.worker.drain_timeout_s + 15)
        if role != Role.EDGE:
            workers.append(name)
    return workers


class StackWatch:
    """Starts again whatever exits, each after its backoff, while the rest serves. A restarted
    process reports its new metrics port; a worker's /readyz moves there."""

    def __init__(self, supervisor: Supervisor, workers: set[str], backoff: Callable[[], Backoff] = Backoff) -> None:
        self.supervisor = supervisor
        self.workers = workers
        self.restarter = Restarter(supervisor, backoff=backoff, before_restart=forget_report)
        self.unreported: set[str] = set()  # restarted, their new metrics port not known yet

    def step(self) -> None:
        for child in self.restarter.step():
            self.unreported.add(child.name)
        for name in list(self.unreported):
            child = self.supervisor[name]
            if (port := reported_metrics_port(child)) is None:
                continue
            self.unreported.discard(name)
            if name in self.workers:
                child.ready_url = local_url(_host(child), port, "/readyz")
            log.info("restarted process serves", role=name, metrics=local_url(_host(child), port, "/metrics"))


def _watch(supervisor: Supervisor, workers: set[str]) -> int:
    """Until a signal (`Stopped`)."""
    watch = StackWatch(supervisor, workers)
    while True:
        watch.step()
        time.sleep(1.0)


def _serve_one(settings: Settings, supervisor: Supervisor) -> int:
    """Start everything, say where it is, and watch it (restarting what exits) until a signal."""
    servers: list[EmbeddedNats | EmbeddedRedis] = []
    if not settings.bus.nats_url:
        nats = EmbeddedNats(settings.stack.data_dir / "nats")
        servers.append(nats)
        supervisor.adopt("nats-server", nats.stop)
        # Every process logs in with its role's login from the file the server wrote.
        settings = settings.replace(nats_url=nats.start(), nats_credentials=str(nats.credentials_file.resolve()))
        log.info("embedded nats-server started", url=settings.bus.nats_url, credentials=settings.bus.nats_credentials)
    if not settings.kv.redis_url:
        redis = EmbeddedRedis(settings.stack.data_dir / "redis", maxmemory=settings.stack.redis_maxmemory,
                              key_prefix=settings.kv.kv_key_prefix)
        servers.append(redis)
        supervisor.adopt("redis-server", redis.stop)
        settings = settings.replace(redis_url=redis.start())
        log.info("embedded redis-compatible server started", url=redact_url(settings.kv.redis_url))
    if settings.uses_bundled_model:
        ensure_bundled_model(Path(settings.served.model))
    if (not settings.engine.engine_step_lock and settings.stack.serving_mode == "disaggregated"
            and resolve_profile(settings.engine).name == "cpu"):
        # both engines share this machine's cores: let them take turns (kv_store/step_lock.py)
        lock = (settings.stack.data_dir / "engine-step.lock").resolve()
        settings = settings.replace(engine_step_lock=str(lock))
    _provision(settings)
    workers = _start_processes(settings, supervisor)
    ports = await_reports(supervisor, workers)
    log.info("starting workers (the engines take about a minute to load)")
    supervisor.wait_ready(START_TIMEOUT_S)
    if (edge_port := reported_metrics_port(supervisor[str(Role.EDGE)])) is not None:
        ports = {str(Role.EDGE): edge_port, **ports}
    edge = settings.edge
    url = f"ws://{edge.edge_host}:{edge.edge_port}"
    cli = os.path.relpath(Path(sys.executable).parent / "grokstack")
    gib = stack_memory_gib([c.pid for c in supervisor.children()] + [s.proc.pid for s in servers if s.proc])
    api = f"http://{edge.edge_host}:{edge.api_port}/v1"
    print(f"\n{UP_LINE}: {url}\n"
          f"  chat in a browser:   http://{edge.edge_host}:{edge.edge_port}/\n"
          f"  chat in a terminal:  {cli} chat --url {url}\n"
          f"  OpenAI-compatible:   {api}  (e.g. OPENAI_BASE_URL={api} with any OpenAI SDK; "
          f"model {settings.served.model_id})\n"
          f"  any websocket client: send {{\"type\": \"chat\", \"messages\": "
          f"[{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}\n"
          f"  jobs straight onto the bus: NATS_URL={settings.bus.nats_url} "
          f"{_credentials_hint(settings)}{cli} publish \"Hello!\"\n"
          f"  Prometheus metrics:  {metrics_urls(settings, ports)}\n"
          f"  resident memory of the stack: {gib:.1f} GiB\n"
          f"  Ctrl-C stops everything.\n", flush=True)
    return _watch(supervisor, set(workers))


def _credentials_hint(settings: Settings) -> str:
    path = settings.bus.credentials_file
    return f"{ENV['nats_credentials']}={os.path.relpath(path)} " if path else ""
