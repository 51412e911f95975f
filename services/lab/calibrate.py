"""`grokstack bench --calibrate`: measure the real engine, write the simulated engine's timing.

One vLLM engine in this process (the decode profile's batch limit, no KV connector), nothing
else running. Three figures fix the sim's linear step model (services/lab/sim_calibration.py):
  - the step time with one sequence decoding: the median gap between its tokens;
  - the step time with 16 decoding together: the median gap while all 16 are decoding (after
    the last one's first token, before the first one finishes);
  - the time to prefill a 512-token prompt alone (max_tokens 1), median of three.
A short prompt's TTFT is recorded too, to check the fit against a point it was not fitted on.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import time

import psutil

from bus.messages import ChatMessage, SamplingSpec
from services.lab.sim_calibration import BATCH, LONG_PROMPT, Calibration, calibration_file
from services.lab.common import PROMPTS
from services.settings import Settings

TOKENS = 64
STORY = ("Write a long, detailed story about a lighthouse keeper who finds a message in a bottle, "
         "with many characters and places.")


async def stream_times(engine, request_id: str, prompt: list[int], max_tokens: int) -> list[tuple[float, int]]:
    """(monotonic time, tokens) per chunk, with the send time first as (t0, 0)."""
    times = [(time.monotonic(), 0)]
    async for chunk in engine.generate(request_id, prompt, SamplingSpec(max_tokens=max_tokens, temperature=0.0),
                                       max_tokens):
        if chunk.token_ids:
            times.append((time.monotonic(), len(chunk.token_ids)))
    return times


def gaps(times: list[tuple[float, int]], start: float = 0.0, end: float = float("inf")) -> list[float]:
    """Seconds per token between chunks after the first token, within [start, end]."""
    out = []
    for (t_prev, _), (t, n) in zip(times[1:], times[2:], strict=False):
        if start <= t_prev and t <= end:
            out += [(t - t_prev) / n] * n
    return out


async def single_step(engine, prompt: list[int]) -> float:
    runs = [gaps(await stream_times(engine, f"cal-one-{i}", prompt, TOKENS)) for i in range(3)]
    return statistics.median(g for run in runs for g in run)


async def batch_step(engine, prompts: list[list[int]]) -> tuple[float, float]:
    """The median step while all decode together, and the whole run's output tokens per second."""
    t0 = time.monotonic()
    runs = await asyncio.gather(*(stream_times(engine, f"cal-b-{i}", p, TOKENS) for i, p in enumerate(prompts)))
    wall = time.monotonic() - t0
    all_started = max(run[1][0] for run in runs)
    first_done = min(run[-1][0] for run in runs)
    together = [g for run in runs for g in gaps(run, all_started, first_done)]
    return statistics.median(together), sum(n for run in runs for _, n in run) / wall


async def prefill_time(engine, prompt: list[int], name: str) -> float:
    times = [await stream_times(engine, f"cal-{name}-{i}", prompt, 1) for i in range(3)]
    return statistics.median(t[1][0] - t[0][0] for t in times)


def tokens_per_prompt_byte(engine) -> float:
    """The model's tokens per byte of the sim's rendering, over the benches' numbered prompts."""
    from services.lab.sim_engine import SimEngine

    sim = SimEngine()
    chats = [[ChatMessage("user", f"#100: {p}")] for p in PROMPTS]
    return sum(len(engine.render_chat(c)) for c in chats) / sum(len(sim.render_chat(c)) for c in chats)


def long_prompt(engine) -> list[int]:
    words = " ".join(f"item {i} of the inventory is a {['red', 'blue', 'green'][i % 3]} box;" for i in range(400))
    ids = engine.render_chat([ChatMessage("user", "Summarize this list: " + words)])
    return ids[:LONG_PROMPT]


async def measure(settings: Settings, **extra: float) -> Calibration:
    from inference.pools import DIRECT
    from services.processes import vllm_engine

    engine = vllm_engine(settings, DIRECT)
    await engine.start()
    try:
        story = engine.render_chat([ChatMessage("user", STORY)])
        await stream_times(engine, "cal-warm", story, 8)
        step1 = await single_step(engine, story)
        prompts = [engine.render_chat([ChatMessage("user", f"{STORY} Part {i + 1}.")]) for i in range(BATCH)]
        step16, total_tps = await batch_step(engine, prompts)
        prefill512 = await prefill_time(engine, long_prompt(engine), "long")
        short = engine.render_chat([ChatMessage("user", PROMPTS[0])])
        ttft_short = await prefill_time(engine, short, "short")
        kv_tokens = getattr(engine, "kv_capacity_tokens", 0) or 23_000
        per_byte = tokens_per_prompt_byte(engine)
    finally:
        await engine.shutdown()
    when = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {settings.served.model_id} fp32 eager (vLLM CPU)"
    return Calibration.fit(step1, step16, prefill512, source=f"measured {when} on {machine}",
                           kv_capacity_tokens=int(kv_tokens), tokens_per_prompt_byte=per_byte,
                           tokens_per_s_at_16=total_tps,
                           ttft_short_s=ttft_short, short_prompt_tokens=len(short), **extra)


async def run_calibrate(settings: Settings, args: argparse.Namespace) -> int:

    busy = psutil.cpu_percent(interval=2.0)
    if busy > 10:  # the figures are for an engine that has the cores to itself
        print(f"warning: other processes keep the CPU {busy:.0f}% busy; the measured step times will be too long")
    cal = await measure(settings, machine_busy_before_pct=busy)
    m = cal.measured
    path = args.calibration or calibration_file(settings.stack.data_dir)
    cal.save(path)
    print(f"measured: step {m['step1_s'] * 1000:.1f} ms at batch 1 ({1 / m['step1_s']:.1f} tok/s), "
          f"{m['step16_s'] * 1000:.1f} ms at batch {BATCH} ({BATCH / m['step16_s']:.1f} tok/s while all decode; "
          f"{m['tokens_per_s_at_16']:.1f} tok/s over the whole run, prompts included); "
          f"{LONG_PROMPT}-token prefill {m['prefill512_s']:.2f} s; TTFT of a {m['short_prompt_tokens']}-token "
          f"prompt {m['ttft_short_s'] * 1000:.0f} ms (the fit predicts "
          f"{cal.step_s(1, m['short_prompt_tokens']) * 1000:.0f} ms)")
    print(f"calibration: {cal.describe()}")
    print(f"wrote {path}")
    return 0
