"""`grokstack bench`: the stack end to end against one vLLM engine in-process, same prompts.

Phase 1 runs the prompts through one plain AsyncLLM in this process (same model and engine
profile; no KV connector, no speculation: what running vLLM alone gives). Phase 2 runs them as
websocket chats through the stack: the one at --url, or one this command starts with
`grokstack up` and stops afterwards. The phases never overlap, so neither steals the other's
cores. Both use temperature 0, so both generate the same tokens. Each phase first sends a few
short prompts one at a time (TTFT with nothing queued), then the concurrent load.

With --target (several times), the same load runs instead against OpenAI-compatible endpoints one
after the other, this stack's and vLLM's own server among them: see services/lab/openai_bench.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bus.messages import ChatMessage, SamplingSpec
from edge.client import EdgeClient
from services.lab.common import (PROMPTS, Phase, RssSampler, Sample, breakdown, drive, log_file, messages_for, probe,
                                 start_stack)
from services.settings import Settings
from services.supervisor import Supervisor, stop_on_signals

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
    from services.lab.spike_bench import add_spike_arguments
    add_spike_arguments(parser)
    from services.lab.conversation_bench import add_conversation_arguments
    add_conversation_arguments(parser)
    from services.lab.spec_bench import add_speculation_arguments
    add_speculation_arguments(parser)


async def direct_phase(settings: Settings, args: argparse.Namespace) -> Phase:
    from inference.pools import DIRECT
    from services.processes import vllm_engine

    phase = Phase("direct vLLM (in-process)")
    engine = vllm_engine(settings, DIRECT)
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
    await probe(phase, args, one)
    with RssSampler([os.getpid()]) as rss:
        phase.wall_s = await drive(args.concurrency, args.requests, one)
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
    await probe(phase, args, one)
    with RssSampler(pids) as rss:
        phase.wall_s = await drive(args.concurrency, args.requests, one)
    phase.peak_rss_gib = rss.peak_gib
    for client in clients:
        await client.close()
    return phase


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
    # SIGTERM and SIGINT stop whatever the bench started (services/supervisor.py)
    with stop_on_signals():
        if args.calibrate:
            from services.lab.calibrate import run_calibrate
            return await run_calibrate(settings, args)
        if args.spike:
            from services.lab.spike_bench import run_spike
            return await run_spike(settings, args)
        if args.speculation:
            from services.lab.spec_bench import run_speculation
            return await run_speculation(settings, args)
        if args.conversation:
            from services.lab.conversation_bench import run_conversation
            return await run_conversation(settings, args)
        if args.target:
            from services.lab.openai_bench import run_targets
            return await run_targets(settings, args)
        direct = None if args.skip_direct else await direct_phase(settings, args)
        with Supervisor() as supervisor:
            if args.url:
                url, pids = args.url, []
            else:
                started = start_stack(supervisor, settings, log_file(settings, "stack"))
                url, pids = started.url, [started.child.pid]
            stack = await stack_phase(url, args, pids)
    print(report(direct, stack, args))
    return 0
