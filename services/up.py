"""`grokstack up`: the whole stack on one machine, as separate processes, stopped cleanly.

Starts an embedded nats-server and Redis-compatible server unless NATS_URL / REDIS_URL name
existing ones, prepares the bundled model once, then runs one prefill worker, one decode
worker and one edge node, each its own process (as they would be on many machines); with
serving_mode=aggregated, one aggregated worker (prefill and decode in one engine) and the edge.
"""

from __future__ import annotations

import dataclasses
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

from bus.credentials import redact_url
from inference.model import ensure_bundled_model
from inference.profiles import resolve_profile
from services.embedded import EmbeddedNats, EmbeddedRedis, free_port
from services.settings import ENV, Settings

log = structlog.get_logger("grokstack.up")

SERVING_ROLES = {"disaggregated": ("prefill", "decode", "edge"), "aggregated": ("aggregated", "edge")}


def child_environment(settings: Settings) -> dict[str, str]:
    """The supervisor's effective settings, handed down the one way processes read them."""
    env = dict(os.environ)
    for f in dataclasses.fields(Settings):
        env[ENV[f.name]] = str(getattr(settings, f.name))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the console readable
    return env


def role_environment(env: dict[str, str], settings: Settings, role: str) -> dict[str, str]:
    """On a shared CPU, decode yields the cores to prefill (see Settings.cpu_nice)."""
    if role == "decode" and settings.engine_step_lock and settings.cpu_nice == 0:
        return {**env, ENV["cpu_nice"]: "5"}
    return env


def metrics_ports(settings: Settings, roles: tuple[str, ...]) -> dict[str, int]:
    """A /metrics port for each worker process: free ones, or metrics_port, metrics_port+1, ...
    when it is set. The edge serves its metrics on its API port."""
    workers = [role for role in roles if role != "edge"]
    return {role: settings.metrics_port + i if settings.metrics_port else free_port()
            for i, role in enumerate(workers)}


def metrics_urls(settings: Settings, ports: dict[str, int]) -> str:
    urls = {"edge": settings.api_port, **ports}
    return "\n                       ".join(f"http://{settings.edge_host}:{port}/metrics ({role})"
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
    url = f"http://{settings.edge_host}:{settings.edge_port}/readyz"
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
        if not settings.nats_url:
            nats = EmbeddedNats(settings.data_dir / "nats")
            servers.append(nats)
            # Every process logs in with its role's login from the file the server wrote.
            settings = settings.replace(nats_url=nats.start(),
                                        nats_credentials=str(nats.credentials_file.resolve()))
            log.info("embedded nats-server started", url=settings.nats_url,
                     credentials=settings.nats_credentials)
        if not settings.redis_url:
            redis = EmbeddedRedis(settings.data_dir / "redis", maxmemory=settings.redis_maxmemory)
            servers.append(redis)
            settings = settings.replace(redis_url=redis.start())
            log.info("embedded redis-compatible server started", url=redact_url(settings.redis_url))
        if not settings.model:
            ensure_bundled_model(settings.model_dir)
        if settings.serving_mode not in SERVING_ROLES:
            raise SystemExit(f"serving_mode must be one of {', '.join(SERVING_ROLES)}, got {settings.serving_mode!r}")
        roles = SERVING_ROLES[settings.serving_mode]
        if (not settings.engine_step_lock and settings.serving_mode == "disaggregated"
                and resolve_profile(settings).name == "cpu"):
            # both engines share this machine's cores: let them take turns (kv_store/step_lock.py)
            settings = settings.replace(engine_step_lock=str((settings.data_dir / "engine-step.lock").resolve()))
        env = child_environment(settings)
        ports = metrics_ports(settings, roles)
        for role in roles:
            role_env = role_environment(env, settings, role)
            if role in ports:
                role_env = {**role_env, ENV["metrics_port"]: str(ports[role])}
            children[role] = subprocess.Popen([sys.executable, "-m", "services.cli", role], env=role_env,
                                              start_new_session=True)
        log.info("starting workers (the engines take about a minute to load)")
        if not wait_ready(settings, children, stop):
            return 0 if stop.is_set() else 1
        url = f"ws://{settings.edge_host}:{settings.edge_port}"
        cli = os.path.relpath(Path(sys.executable).parent / "grokstack")
        gib = stack_memory_gib([c.pid for c in children.values()] + [s.proc.pid for s in servers if s.proc])
        api = f"http://{settings.edge_host}:{settings.api_port}/v1"
        print(f"\ngrokstack is up: {url}\n"
              f"  chat in a browser:   http://{settings.edge_host}:{settings.edge_port}/\n"
              f"  chat in a terminal:  {cli} chat --url {url}\n"
              f"  OpenAI-compatible:   {api}  (e.g. OPENAI_BASE_URL={api} with any OpenAI SDK; "
              f"model {settings.model_id})\n"
              f"  any websocket client: send {{\"type\": \"chat\", \"messages\": "
              f"[{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}\n"
              f"  jobs straight onto the bus: NATS_URL={settings.nats_url} "
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
        stop_children(children, settings.drain_timeout_s + 15)
        for server in reversed(servers):
            server.stop()
        log.info("stack stopped")


def _credentials_hint(settings: Settings) -> str:
    path = settings.nats_credentials_file
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
