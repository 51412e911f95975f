"""`grokstack bench`: the stack end to end against one vLLM engine in-process, same prompts.

Phase 1 runs the prompts through one plain AsyncLLM in this process (same model and engine
profile; no KV connector, no speculation: what running vLLM alone gives). Phase 2 runs them as
websocket chats through the stack: the one at --url, or one this command starts with
`grokstack up` and stops afterwards. The phases never overlap, so neither steals the other's
cores. Both use temperature 0, so both generate the same tokens. Each phase first sends a few
short prompts one at a time (TTFT with nothing queued), then the concurrent load.

With --target (several times), the same load runs instead against OpenAI-compatible endpoints one
after the other, this stack's and vLLM's own server among them: see services/openai_bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import psutil

from bus.messages import ChatMessage, SamplingSpec
from edge.client import EdgeClient
from services.embedded import free_port
from services.settings import Settings

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


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="edge URL of a running stack; default: start one")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--probe", type=int, default=8,
                        help="single requests, one at a time, before the load: TTFT without queueing")
    parser.add_argument("--think-s", type=float, default=2.0,
                        help="pause between the single requests, as a person reading the answer would")
    parser.add_argument("--skip-direct", action="store_true", help="only measure the stack")
    parser.add_argument("--target", action="append", default=None, metavar="URL|stack|vllm",
                        help="measure OpenAI-compatible endpoints one after the other instead, same client and "
                             "prompts: an API base URL (http://host:port/v1), 'stack' (started with grokstack up; "
                             "'stack:aggregated' / 'stack:disaggregated' pick its serving mode) or 'vllm' "
                             "(vLLM's own OpenAI server, started with the same model and engine settings); give it "
                             "several times to compare them side by side")
    from services.spike_bench import add_spike_arguments
    add_spike_arguments(parser)


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


def messages_for(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def _probe(phase: Phase, args: argparse.Namespace, one: Any) -> None:
    """Short prompts one at a time: the latency a request sees when nothing else is queued."""
    for i in range(args.probe):
        await asyncio.sleep(args.think_s)
        await one(0, PROMPTS[i % len(PROMPTS)], into=phase.probe)


async def _drive(concurrency: int, requests: int, one: Any) -> float:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])
    t0 = time.monotonic()

    async def lane(n: int) -> None:
        while not queue.empty():
            await one(n, queue.get_nowait())

    await asyncio.gather(*(lane(n) for n in range(concurrency)))
    return time.monotonic() - t0


async def direct_phase(settings: Settings, args: argparse.Namespace) -> Phase:
    from inference.vllm_engine import VllmEngine

    phase = Phase("direct vLLM (in-process)")
    engine = VllmEngine(settings, "direct")
    await engine.start()
    sampling = SamplingSpec(max_tokens=args.max_tokens, temperature=0.0)
    counter = iter(range(1_000_000))

    async def one(_lane: int, prompt: str, into: list[Sample] | None = phase.samples) -> None:
        ids = engine.render_chat([ChatMessage("user", prompt)])
        t0 = last = time.monotonic()
        ttft, tokens, gaps = 0.0, 0, []
        async for chunk in engine.generate(f"bench-{next(counter)}", ids, sampling, args.max_tokens):
            now = time.monotonic()
            if chunk.token_ids:
                if not tokens:
                    ttft = now - t0
                else:
                    gaps += [(now - last) / len(chunk.token_ids)] * len(chunk.token_ids)
                tokens += len(chunk.token_ids)
                last = now
        if into is not None:
            into.append(Sample(ttft, time.monotonic() - t0, tokens, gaps))

    await one(0, PROMPTS[0], into=None)  # warm-up
    await _probe(phase, args, one)
    with RssSampler([os.getpid()]) as rss:
        phase.wall_s = await _drive(args.concurrency, args.requests, one)
    phase.peak_rss_gib = rss.peak_gib
    await engine.shutdown()
    return phase


async def stack_phase(url: str, args: argparse.Namespace, pids: list[int]) -> Phase:
    phase = Phase("grokstack (websocket -> NATS -> prefill -> Redis -> decode)")
    clients = [await EdgeClient.connect(url) for _ in range(args.concurrency)]

    async def one(lane: int, prompt: str, into: list[Sample] | None = phase.samples) -> None:
        result = await clients[lane].complete(messages_for(prompt), max_tokens=args.max_tokens,
                                              temperature=0.0, priority="interactive")
        if result.error or not result.done:
            phase.errors.append(str(result.error))
            return
        times = [t for t, _ in result.token_times]
        counts = [n for _, n in result.token_times]
        gaps = [g for i in range(1, len(times)) for g in [(times[i] - times[i - 1]) / max(counts[i], 1)] * counts[i]]
        if into is not None:
            into.append(Sample(times[0] - result.started, times[-1] - result.started,
                               result.done["usage"]["completion_tokens"], gaps, result.done))

    await one(0, PROMPTS[0], into=None)
    await _probe(phase, args, one)
    with RssSampler(pids) as rss:
        phase.wall_s = await _drive(args.concurrency, args.requests, one)
    phase.peak_rss_gib = rss.peak_gib
    for client in clients:
        await client.close()
    return phase


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


def start_stack(settings: Settings) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, GROKSTACK_EDGE_PORT=str(port), GROKSTACK_API_PORT=str(free_port()),
               GROKSTACK_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up"], env=env,
                            stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the stack failed to start (run `grokstack up` to see why)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, f"ws://127.0.0.1:{port}"
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("the stack did not become ready in time")


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
    bus = ttft - timing("queue_ms") - timing("prefill_ms")
    return [
        f"\nwhere the stack's time goes, {label} (medians, ms):",
        f"  TTFT {ttft:.1f} = prefill queue {timing('queue_ms'):.1f} + prefill engine {timing('prefill_ms'):.1f}"
        f" (of which KV write {med(kv('write_ms')):.1f}) + bus and edge {bus:.1f}",
        f"  decode: queue {timing('decode_queue_ms'):.1f}, KV read {med(kv('read_ms')):.1f}, "
        f"generation {timing('decode_ms'):.1f}",
        f"  KV moved: {sum(kv('bytes_written')) / 1e6:.1f} MB written, {sum(kv('bytes_read')) / 1e6:.1f} MB read;"
        f" write {sum(kv('write_ms')):.0f} ms and read {sum(kv('read_ms')):.0f} ms in total;"
        f" {sum(1 for r in kv('recomputed') if r)} of {len(done)} requests recomputed their prompt",
    ]


def report(direct: Phase | None, stack: Phase, args: argparse.Namespace) -> str:
    ms = 1000.0
    rows = [("TTFT p50, one at a time (ms)", lambda p: p.probe_ttft(0.5) * ms),
            (f"TTFT p50, {args.concurrency} at once (ms)", lambda p: p.ttft(0.5) * ms),
            (f"TTFT p95, {args.concurrency} at once (ms)", lambda p: p.ttft(0.95) * ms),
            ("ITL p50 (ms/token)", lambda p: p.itl_p50() * ms),
            ("output tokens/s", lambda p: p.tokens_per_s()),
            ("requests ok", lambda p: float(len(p.samples))),
            ("peak resident memory (GiB)", lambda p: p.peak_rss_gib)]
    out = [f"\n{args.probe} short prompts one at a time ({args.think_s:g} s apart), then {args.requests} requests "
           f"{args.concurrency} at once; max_tokens {args.max_tokens}, temperature 0, {os.cpu_count()} cores",
           f"{'':<34}{'direct':>12}{'stack':>12}{'stack/direct':>14}"]
    for name, f in rows:
        d = f(direct) if direct else float("nan")
        s = f(stack)
        out.append(f"{name:<34}{d:>12.1f}{s:>12.1f}{(s / d if d else float('nan')):>14.2f}")
    if stack.errors:
        out.append(f"stack errors: {len(stack.errors)}: {stack.errors[:3]}")
    for label, samples in (("one at a time", stack.probe), (f"{args.concurrency} at once", stack.samples)):
        out += breakdown(label, [s.done for s in samples if s.done])
    if direct:
        write_ms = statistics.median([s.done["kv"]["write_ms"] for s in stack.probe if s.done] or [0.0])
        gap = (stack.probe_ttft(0.5) - direct.probe_ttft(0.5)) * ms - write_ms
        ratio = stack.tokens_per_s() / direct.tokens_per_s() if direct.tokens_per_s() else float("nan")
        out += ["\ntargets:",
                f"  TTFT p50 of a short prompt within 20 ms of direct (KV write of {write_ms:.1f} ms "
                f"excluded): {gap:+.1f} ms -> {'met' if gap <= 20 else 'MISSED'}",
                f"  output tokens/s at {args.concurrency} at once >= 0.9x direct: {ratio:.2f}x -> "
                f"{'met' if ratio >= 0.9 else 'MISSED'}"]
    if stack.peak_rss_gib:
        out.append(f"  whole stack under 10 GiB resident: {stack.peak_rss_gib:.1f} GiB -> "
                   f"{'met' if stack.peak_rss_gib < 10 else 'MISSED'}")
    return "\n".join(out)


async def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    if args.calibrate:
        from services.calibrate import run_calibrate
        return await run_calibrate(settings, args)
    if args.spike:
        from services.spike_bench import run_spike
        return await run_spike(settings, args)
    if args.target:
        from services.openai_bench import run_targets
        return await run_targets(settings, args)
    direct = None if args.skip_direct else await direct_phase(settings, args)
    proc = None
    if args.url:
        url, pids = args.url, []
    else:
        proc, url = start_stack(settings)
        pids = [proc.pid]
    try:
        stack = await stack_phase(url, args, pids)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(120)
    print(report(direct, stack, args))
    return 0
