"""What the lab's benchmarks and drills share: the prompts, the samples and phases they measure,
quantiles, the load driver, how a client waits before asking again, the stack's time breakdown, a
resident-memory sampler, and the stack (`grokstack up`) started under a supervisor."""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

import psutil

from services.embedded import free_port
from bus.roles import Role
from services.settings import ENV, Settings
from services.telemetry import read_ports
from services.up import UP_LINE, ports_file
from services.supervisor import Child, StartFailed, Stopped, Supervisor, child_environment, local_host, stop_on_signals

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for better sleep.",
    "Explain what a black hole is in two sentences.",
    "Write a haiku about autumn leaves.",
    "What are the primary colors?",
    "How do I boil an egg?",
    "Name three famous painters and one work by each.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
    "What does a compiler do?",
    "List four fruits that are red.",
    "How many legs does a spider have, and why?",
    "Describe the water cycle briefly.",
    "What is the difference between weather and climate?",
    "Write a two-line poem about the sea.",
    "Give me a fun fact about octopuses.",
]


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int
    token_gaps: list[float]  # seconds per token, a frame's gap split over its tokens
    done: dict[str, Any] | None = None


@dataclass
class Phase:
    name: str
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    peak_rss_gib: float = 0.0
    probe: list[Sample] = field(default_factory=list)  # one request at a time, no load

    def ttft(self, q: float) -> float:
        return quantile([s.ttft_s for s in self.samples], q)

    def probe_ttft(self, q: float) -> float:
        return quantile([s.ttft_s for s in self.probe], q)

    def itl_p50(self) -> float:
        return quantile([g for s in self.samples for g in s.token_gaps], 0.5)

    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s if self.wall_s else 0.0


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# A clear, immediate "not now" before acceptance, with when to come back: not a failure of the stack.
REFUSALS = frozenset({"overloaded", "rate_limited", "too_many_requests", "unavailable"})
RETRY_JITTER = 0.5  # a retry comes up to this share of the retry-after later: refused together,
# clients do not all come back in the same instant
BACKOFF_FIRST_S = 0.5  # after a failure that says nothing of when to retry: doubling, to BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0


def retry_delay(retry_after_s: float | None, failures: int, rng: random.Random) -> float:
    """How long a client waits before asking again, as a well-behaved one does: what the edge said
    (`retry_after_s`) plus jitter; without it, exponential backoff with jitter by the number of
    failures in a row (1 for the first)."""
    if retry_after_s is not None and retry_after_s > 0:
        return retry_after_s * (1 + rng.uniform(0, RETRY_JITTER))
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, failures - 1))
    return rng.uniform(ceiling / 2, ceiling)


def messages_for(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def probe(phase: Phase, args: argparse.Namespace, one: Any) -> None:
    """Short prompts one at a time: the latency a request sees when nothing else is queued."""
    for i in range(args.probe):
        await asyncio.sleep(args.think_s)
        await one(0, PROMPTS[i % len(PROMPTS)], into=phase.probe)


async def drive(concurrency: int, requests: int, one: Any) -> float:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])
    t0 = time.monotonic()

    async def lane(n: int) -> None:
        while not queue.empty():
            await one(n, queue.get_nowait())

    await asyncio.gather(*(lane(n) for n in range(concurrency)))
    return time.monotonic() - t0


class RssSampler:
    """Peak resident memory of some process trees, sampled every 0.5 s in a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak_gib = 0.0
        self._stop = False
        self._thread: Any = None

    def _sample(self) -> None:
        while not self._stop:
            total = 0
            for pid in self.pids:
                try:
                    root = psutil.Process(pid)
                    total += sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                except psutil.NoSuchProcess:
                    pass
            self.peak_gib = max(self.peak_gib, total / 1024**3)
            time.sleep(0.5)

    def __enter__(self) -> "RssSampler":
        import threading
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()


def log_file(settings: Settings, name: str) -> Path:
    """Where a process a lab command starts writes its output: <data dir>/bench-<name>.log."""
    settings.stack.data_dir.mkdir(parents=True, exist_ok=True)
    return settings.stack.data_dir / f"bench-{name}.log"


@dataclass
class StartedStack:
    """`grokstack up` started by a lab command, and where its edge listens."""
    child: Child
    host: str
    edge_port: int
    api_port: int
    ports_file: Path  # where the edge reports the metrics port it bound (services/up.py)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.edge_port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}/v1"

    @property
    def metrics_url(self) -> str:
        """The edge's /metrics: on its own metrics port (not the public API's), once it reported it."""
        deadline = time.monotonic() + 60
        while (ports := read_ports(self.ports_file)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if ports is None:
            raise SystemExit(f"the edge did not report its metrics port in {self.ports_file}")
        return f"http://{self.host}:{ports['metrics_port']}/metrics"


def start_stack(supervisor: Supervisor, settings: Settings, log: Path, api_port: int = 0) -> StartedStack:
    """`grokstack up` with these settings (its edge logging warnings only), as a child of
    `supervisor`, once its edge answers /readyz on the API port (which the edge binds last). The
    edge's ports are free ones, the API's `api_port` when given (it must be free)."""
    host = local_host(settings.edge.edge_host)
    if api_port:
        with socket.socket() as s:
            if s.connect_ex((host, api_port)) == 0:
                raise SystemExit(f"something already listens on {host}:{api_port}: stop it or set GROKSTACK_API_PORT")
    edge_port, api_port = free_port(), api_port or free_port()
    env = child_environment(settings) | {ENV["edge_port"]: str(edge_port), ENV["api_port"]: str(api_port),
                                         ENV["log_level"]: "warning"}
    child = supervisor.start("grokstack up", [sys.executable, "-m", "services.cli", "up"], env=env, log=log,
                             ready_url=f"http://{host}:{api_port}/readyz", grace_s=120)
    try:
        supervisor.wait_ready(900, [child.name])
    except StartFailed as exc:
        raise SystemExit(f"the stack failed to start: {exc}") from None
    # The edge is ready once it reaches NATS, before the engines have loaded: `grokstack up`
    # says when every worker is ready too.
    deadline = time.monotonic() + 900
    while UP_LINE not in log.read_text(errors="replace"):
        if child.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the stack failed to start: see {log}")
        time.sleep(0.5)
    return StartedStack(child, host, edge_port, api_port, ports_file(settings, str(Role.EDGE)))


def breakdown(label: str, done: list[dict[str, Any]]) -> list[str]:
    """Where the stack's time went, from the timings the final frames carry (medians, ms)."""
    if not done:
        return []

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    def timing(key: str) -> float:
        return med([d["timings"][key] for d in done])

    def kv(key: str) -> list[Any]:
        return [d["kv"][key] for d in done]

    ttft = med([d["usage"]["ttft_ms"] for d in done])
    # per answer, then the median: the medians of its parts do not add up to the median TTFT
    bus = med([d["usage"]["ttft_ms"] - d["timings"]["queue_ms"] - d["timings"]["prefill_ms"] for d in done])
    return [
        f"\nwhere the stack's time goes, {label} (medians, ms):",
        f"  TTFT {ttft:.1f}: prefill queue {timing('queue_ms'):.1f}, prefill engine {timing('prefill_ms'):.1f}"
        f" (of which KV write {med(kv('write_ms')):.1f}), bus and edge (the rest of each answer's) {bus:.1f}",
        f"  decode: queue {timing('decode_queue_ms'):.1f}, KV read {med(kv('read_ms')):.1f}, "
        f"generation {timing('decode_ms'):.1f}",
        f"  KV moved: {sum(kv('bytes_written')) / 1e6:.1f} MB written, {sum(kv('bytes_read')) / 1e6:.1f} MB read;"
        f" write {sum(kv('write_ms')):.0f} ms and read {sum(kv('read_ms')):.0f} ms in total;"
        f" {sum(1 for r in kv('recomputed') if r)} of {len(done)} requests recomputed their prompt",
    ]


def run_drill(cluster: "Drilled", workdir: Path, starting: str, drill: Callable[[], Awaitable[bool]]) -> int:
    """Start `cluster`, run `drill` on it, stop everything it started (also on SIGTERM or SIGINT,
    during the start or the drill): 0 when the drill passed, 1 when not."""
    with stop_on_signals():
        try:
            print(f"{starting} (logs in {workdir}) ...", flush=True)
            cluster.start()
            ok = asyncio.run(drill())
        except Stopped as exc:
            return exc.code
        finally:
            cluster.stop()
    print(f"logs: {workdir}", flush=True)
    return 0 if ok else 1


class Drilled(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def token_faults(frames: list[tuple[int, int]], completed: bool, completion_tokens: int) -> tuple[int, int]:
    """(duplicated, missing) tokens of one answer as its client saw them, from its token frames
    as (sequence number, tokens it carried): a frame carries several tokens when speculation was
    accepted. Duplicated: the tokens of frames seen again. Missing: a finished answer's tokens its
    final usage counts that no frame brought; an unfinished one's frames missing below the last."""
    seen: dict[int, int] = {}
    duplicated = 0
    for seq, tokens in frames:
        if seq in seen:
            duplicated += tokens
        seen[seq] = tokens
    if completed:
        return duplicated, max(0, completion_tokens - sum(seen.values()))
    return duplicated, len(set(range(max(seen, default=-1) + 1)) - set(seen))
