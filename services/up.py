"""`grokstack up`: the whole stack on one machine, as separate processes, stopped cleanly.

Starts an embedded nats-server and Redis-compatible server unless NATS_URL / REDIS_URL name
existing ones, prepares the bundled model once, then runs one prefill worker, one decode
worker and one edge node, each its own process (as they would be on many machines); with
serving_mode=aggregated, one aggregated worker (prefill and decode in one engine) and the edge.

With `--regions eu,us` (any list), each region gets its own servers (a JetStream domain, a transit
server, a Redis-compatible server: services/regions.py, with `--wan-delay-ms` between regions), an
edge and one aggregated worker: several disaggregated pairs would be too many engines for one
machine's cores.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import structlog

from bus.roles import Role
from bus.section import redact_url
from inference.model import ensure_bundled_model
from inference.profiles import resolve_profile
from services.embedded import EmbeddedNats, EmbeddedRedis, free_port
from services.regions import RegionMesh
from services.settings import ENV, Settings
from services.supervisor import StartFailed, Stopped, Supervisor, child_environment, local_url, stop_on_signals

__all__ = ["metrics_ports", "role_environment", "run_up"]

log = structlog.get_logger("grokstack.up")

SERVING_ROLES = {"disaggregated": (Role.PREFILL, Role.DECODE, Role.EDGE), "aggregated": (Role.AGGREGATED, Role.EDGE)}
START_TIMEOUT_S = 900.0  # engines load in about a minute here; a cold cache or a big model takes longer


def role_environment(env: dict[str, str], settings: Settings, role: str) -> dict[str, str]:
    """On a shared CPU, decode yields the cores to prefill (see EngineConfig.cpu_nice)."""
    if role == Role.DECODE and settings.engine.engine_step_lock and settings.engine.cpu_nice == 0:
        return {**env, ENV["cpu_nice"]: "5"}
    return env


def metrics_ports(settings: Settings, roles: tuple[str, ...]) -> dict[str, int]:
    """A /metrics port for each worker process: free ones, or metrics_port, metrics_port+1, ...
    when it is set. The edge serves its metrics on its API port."""
    workers = [role for role in roles if role != Role.EDGE]
    first = settings.worker.metrics_port
    return {role: first + i if first else free_port() for i, role in enumerate(workers)}


def metrics_urls(settings: Settings, ports: dict[str, int]) -> str:
    urls = {"edge": settings.edge.api_port, **ports}
    return "\n                       ".join(f"http://{settings.edge.edge_host}:{port}/metrics ({role})"
                                         for role, port in urls.items())


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


def ready_url(settings: Settings, role: str, ports: dict[str, int]) -> str:
    """Where a process of the stack says it serves: a worker's /readyz on its metrics port (its
    engine has started and it pulls work), the edge's on its websocket port (a prefill and a
    decode worker, or an aggregated one, sent a heartbeat)."""
    port = settings.edge.edge_port if role == Role.EDGE else ports[role]
    return local_url(settings.edge.edge_host, port, "/readyz")


def run_up(settings: Settings) -> int:
    """Until SIGINT or SIGTERM (0), or until a process exits (1); then everything it started is
    stopped, newest first."""
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
                      redis_maxmemory=settings.stack.redis_maxmemory)
    supervisor.adopt("region servers", mesh.stop)
    mesh.start()
    if settings.uses_bundled_model:
        ensure_bundled_model(Path(settings.served.model))
    settings = settings.replace(serving_mode="aggregated")
    if not settings.engine.engine_step_lock and resolve_profile(settings.engine).name == "cpu":
        # the regions' engines share this machine's cores: let them take turns (kv_store/step_lock.py)
        settings = settings.replace(engine_step_lock=str((settings.stack.data_dir / "engine-step.lock").resolve()))
    regional: dict[str, Settings] = {}
    for region in names:
        servers = mesh[region]
        s = settings.replace(nats_url=servers.nats_url, nats_credentials=str(mesh.credentials_file.resolve()),
                             redis_url=servers.redis_url, region=region, worker_id=f"{region}-1",
                             edge_port=free_port(), api_port=free_port(), metrics_port=0)
        _start_processes(s, supervisor, prefix=f"{region}-")
        regional[region] = s
        log.info("region started", region=region, nats=s.bus.nats_url)
    log.info("starting workers (the engines take about a minute to load)")
    supervisor.wait_ready(START_TIMEOUT_S)
    cli = os.path.relpath(Path(sys.executable).parent / "grokstack")
    lines = [f"\ngrokstack is up in {len(names)} regions ({settings.stack.wan_delay_ms:g} ms one way between "
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
    return _watch(supervisor)


def _start_processes(settings: Settings, supervisor: Supervisor, prefix: str = "") -> dict[str, int]:
    """The serving mode's workers and the edge, each its own process; their metrics ports."""
    roles = SERVING_ROLES[settings.stack.serving_mode]
    env = child_environment(settings)
    ports = metrics_ports(settings, roles)
    for role in roles:
        role_env = role_environment(env, settings, role)
        if role in ports:
            role_env = {**role_env, ENV["metrics_port"]: str(ports[role])}
        # Their output goes to this console, as a one-machine stack's should.
        supervisor.start(f"{prefix}{role}", [sys.executable, "-m", "services.cli", str(role)], env=role_env,
                         ready_url=ready_url(settings, role, ports), grace_s=settings.worker.drain_timeout_s + 15)
    return ports


def _watch(supervisor: Supervisor) -> int:
    while True:
        for child in supervisor.exited():
            log.error("process exited; stopping the stack", role=child.name, code=child.proc.returncode)
            return 1
        time.sleep(1.0)


def _serve_one(settings: Settings, supervisor: Supervisor) -> int:
    """Start everything, say where it is, and watch it until a signal or a process's exit."""
    servers: list[EmbeddedNats | EmbeddedRedis] = []
    if not settings.bus.nats_url:
        nats = EmbeddedNats(settings.stack.data_dir / "nats")
        servers.append(nats)
        supervisor.adopt("nats-server", nats.stop)
        # Every process logs in with its role's login from the file the server wrote.
        settings = settings.replace(nats_url=nats.start(), nats_credentials=str(nats.credentials_file.resolve()))
        log.info("embedded nats-server started", url=settings.bus.nats_url, credentials=settings.bus.nats_credentials)
    if not settings.kv.redis_url:
        redis = EmbeddedRedis(settings.stack.data_dir / "redis", maxmemory=settings.stack.redis_maxmemory)
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
    ports = _start_processes(settings, supervisor)
    log.info("starting workers (the engines take about a minute to load)")
    supervisor.wait_ready(START_TIMEOUT_S)
    edge = settings.edge
    url = f"ws://{edge.edge_host}:{edge.edge_port}"
    cli = os.path.relpath(Path(sys.executable).parent / "grokstack")
    gib = stack_memory_gib([c.pid for c in supervisor.children()] + [s.proc.pid for s in servers if s.proc])
    api = f"http://{edge.edge_host}:{edge.api_port}/v1"
    print(f"\ngrokstack is up: {url}\n"
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
    return _watch(supervisor)


def _credentials_hint(settings: Settings) -> str:
    path = settings.bus.credentials_file
    return f"{ENV['nats_credentials']}={os.path.relpath(path)} " if path else ""
