"""`grokstack up`: the whole stack on one machine, as separate processes, stopped cleanly.

Starts an embedded nats-server and Redis-compatible server unless NATS_URL / REDIS_URL name
existing ones, prepares the bundled model once, then runs one prefill worker, one decode
worker and one edge node, each its own process (as they would be on many machines); with
serving_mode=aggregated, one aggregated worker (prefill and decode in one engine) and the edge.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import structlog

from bus.roles import Role
from bus.section import redact_url
from inference.model import ensure_bundled_model
from inference.profiles import resolve_profile
from services.embedded import EmbeddedNats, EmbeddedRedis, free_port
from services.settings import ENV, Settings, environment_of

log = structlog.get_logger("grokstack.up")

SERVING_ROLES = {"disaggregated": (Role.PREFILL, Role.DECODE, Role.EDGE), "aggregated": (Role.AGGREGATED, Role.EDGE)}


def child_environment(settings: Settings) -> dict[str, str]:
    """The supervisor's effective settings, handed down the one way processes read them."""
    env = {**os.environ, **environment_of(settings)}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the console readable
    return env


def role_environment(env: dict[str, str], settings: Settings, role: str) -> dict[str, str]:
    """On a shared CPU, decode yields the cores to prefill (see Settings.cpu_nice)."""
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


def wait_ready(settings: Settings, children: dict[str, subprocess.Popen], stop: threading.Event,
               timeout: float = 900.0) -> bool:
    url = f"http://{settings.edge.edge_host}:{settings.edge.edge_port}/readyz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        for role, proc in children.items():
            if proc.poll() is not None:
                log.error("process exited during start", role=role, code=proc.returncode)
                return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(0.5)
    return False


def run_up(settings: Settings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    servers: list[EmbeddedNats | EmbeddedRedis] = []
    children: dict[str, subprocess.Popen] = {}
    try:
        if not settings.bus.nats_url:
            nats = EmbeddedNats(settings.stack.data_dir / "nats")
            servers.append(nats)
            # Every process logs in with its role's login from the file the server wrote.
            settings = settings.replace(nats_url=nats.start(),
                                        nats_credentials=str(nats.credentials_file.resolve()))
            log.info("embedded nats-server started", url=settings.bus.nats_url,
                     credentials=settings.bus.nats_credentials)
        if not settings.kv.redis_url:
            redis = EmbeddedRedis(settings.stack.data_dir / "redis", maxmemory=settings.stack.redis_maxmemory)
            servers.append(redis)
            settings = settings.replace(redis_url=redis.start())
            log.info("embedded redis-compatible server started", url=redact_url(settings.kv.redis_url))
        if settings.uses_bundled_model:
            ensure_bundled_model(Path(settings.served.model))
        roles = SERVING_ROLES[settings.stack.serving_mode]
        if (not settings.engine.engine_step_lock and settings.stack.serving_mode == "disaggregated"
                and resolve_profile(settings.engine).name == "cpu"):
            # both engines share this machine's cores: let them take turns (kv_store/step_lock.py)
            lock = (settings.stack.data_dir / "engine-step.lock").resolve()
            settings = settings.replace(engine_step_lock=str(lock))
        env = child_environment(settings)
        ports = metrics_ports(settings, roles)
        for role in roles:
            role_env = role_environment(env, settings, role)
            if role in ports:
                role_env = {**role_env, ENV["metrics_port"]: str(ports[role])}
            children[role] = subprocess.Popen([sys.executable, "-m", "services.cli", str(role)], env=role_env,
                                              start_new_session=True)
        log.info("starting workers (the engines take about a minute to load)")
        if not wait_ready(settings, children, stop):
            return 0 if stop.is_set() else 1
        edge = settings.edge
        url = f"ws://{edge.edge_host}:{edge.edge_port}"
        cli = os.path.relpath(Path(sys.executable).parent / "grokstack")
        gib = stack_memory_gib([c.pid for c in children.values()] + [s.proc.pid for s in servers if s.proc])
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
        while not stop.is_set():
            for role, proc in children.items():
                if proc.poll() is not None:
                    log.error("process exited; stopping the stack", role=role, code=proc.returncode)
                    return 1
            stop.wait(1.0)
        return 0
    finally:
        stop_children(children, settings.worker.drain_timeout_s + 15)
        for server in reversed(servers):
            server.stop()
        log.info("stack stopped")


def _credentials_hint(settings: Settings) -> str:
    path = settings.bus.credentials_file
    return f"{ENV['nats_credentials']}={os.path.relpath(path)} " if path else ""


def stop_children(children: dict[str, subprocess.Popen], grace: float) -> None:
    """SIGTERM every process, wait up to `grace` for all, then SIGKILL each one's process group
    (engines run in child processes of their worker)."""
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for role, proc in children.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("process did not stop in time; killing it", role=role)
        # Engines run in child processes of their worker: take the whole group down.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
