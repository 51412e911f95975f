"""`grokstack bench --target ...`: the same load against OpenAI-compatible endpoints, side by side.

Each target is an API base URL, `stack` (this stack, started with `grokstack up`, through its OpenAI
API) or `vllm` (vLLM's own OpenAI server on the same model folder and CPU engine settings). Targets
run strictly one after the other: one this command starts is stopped before the next starts, so two
engines never share the cores. All are measured with one client, the official `openai` SDK,
streaming, temperature 0: a few single requests one at a time (--think-s apart), then the load.

The OpenAI stream does not say how many tokens a chunk carries; the usage in the last chunk gives
the total. When there are fewer content chunks than tokens (speculative decoding sends several per
chunk), the tokens are taken as spread evenly over the gaps between content chunks.

For the stack, admission is checked in the same run (services/lab/spike_report.py wait_lines):
each request's estimated queue wait (the `X-Grokstack-Estimated-Wait` header of its answer, a
refusal's message, else the edge's estimate gauge last read before it was sent) against the wait
it had (its final timings), and how many of the `overloaded` refusals were right.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from services.embedded import free_port
from services.lab.common import (PROMPTS, Phase, RssSampler, Sample, breakdown, drive, log_file, messages_for, probe,
                                 start_stack)
from services.lab.spike_client import measured_wait_s, refusal_estimate
from services.lab.spike_report import WaitSample, gauge_at, wait_lines
from services.lab.spike_watch import EdgeWaits
from services.settings import Settings
from services.supervisor import Stopped, Supervisor

# stack: as GROKSTACK_SERVING_MODE says; stack:<mode> picks the serving mode (see Settings)
KEYWORDS = ("stack", "stack:aggregated", "stack:disaggregated", "vllm")
NAN = float("nan")
ESTIMATE_HEADER = "X-Grokstack-Estimated-Wait"  # the queue wait the edge judged a request by
# The bench names no priority: without API keys the edge serves a request as interactive.
DEFAULT_PRIORITY = "interactive"


@dataclass
class TargetPhase(Phase):
    url: str = ""
    started: bool = False  # this command started (and stopped) the target's processes
    missing_usage: int = 0  # responses without usage: their tokens are unknown
    admission: list[WaitSample] = field(default_factory=list)  # the load's requests as admission saw them
    gauge: list[tuple[float, str, float]] = field(default_factory=list)  # the edge's estimate, as read
    gauge_t0: float = 0.0  # the monotonic time its samples count from

    def tokens_per_s(self) -> float:
        return NAN if self.missing_usage or not self.samples else super().tokens_per_s()

    def peak_rss(self) -> float:
        return self.peak_rss_gib if self.started else NAN


def parse_targets(values: list[str]) -> list[str]:
    for value in values:
        if value not in KEYWORDS and urlparse(value).scheme not in ("http", "https"):
            raise SystemExit(f"--target {value!r}: give 'stack', 'vllm' or an http(s) API base URL")
    return values


def label_for(target: str) -> str:
    return target if target in KEYWORDS else urlparse(target).netloc or target


# --- processes this command starts and stops ---

def start_vllm(supervisor: Supervisor, settings: Settings) -> tuple[str, Path]:
    """vLLM's own OpenAI server, same model folder and engine profile (dtype, eager, VLLM_* env),
    as a child of `supervisor`, once its /health answers; its API base URL and its log."""
    from inference.profiles import resolve_profile, vllm_environment
    from services.processes import engine_setup
    if settings.uses_bundled_model:
        from inference.model import ensure_bundled_model
        ensure_bundled_model(Path(settings.served.model))
    profile = resolve_profile(settings.engine)
    env = dict(os.environ)
    for key, value in vllm_environment(settings.engine, profile, engine_setup(settings).cache_root).items():
        env.setdefault(key, value)  # as the workers do: values the operator set are kept
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", settings.served.model, "--served-model-name", settings.served.model_id,
            "--dtype", profile.dtype, "--max-model-len", str(settings.served.max_model_len),
            "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--enforce-eager"] if profile.enforce_eager else []
    if profile.name == "gpu":
        argv += ["--gpu-memory-utilization", str(settings.engine.gpu_memory_utilization)]
    log = log_file(settings, "vllm")
    supervisor.start("vLLM's OpenAI server", argv, env=env, log=log, ready_url=f"http://127.0.0.1:{port}/health",
                     grace_s=30)
    supervisor.wait_ready(900)
    return f"http://127.0.0.1:{port}/v1", log


# --- measuring one target ---

def itl_gaps(times: list[float], tokens: int, finish_reason: str | None) -> list[float]:
    """Seconds per token between content chunks, one value per token (see the module doc)."""
    gaps = [b - a for a, b in pairwise(times)]
    if not gaps:
        return []
    # after the first content chunk; a stop token (EOS) is counted in usage but shows no text
    later = tokens - 1 - (1 if finish_reason == "stop" else 0)
    per_chunk = max(1.0, later / len(gaps))
    return [g / per_chunk for g in gaps for _ in range(max(1, round(per_chunk)))]


async def _model_id(client: Any, fallback: str) -> str:
    try:
        ids = [m.id for m in (await client.models.list()).data]
    except Exception:  # noqa: BLE001 - an endpoint without /models still serves chats
        return fallback
    return fallback if fallback in ids or not ids else ids[0]


async def openai_phase(label: str, url: str, settings: Settings, args: argparse.Namespace,
                       pids: list[int], metrics_url: str | None = None) -> TargetPhase:
    import openai
    phase = TargetPhase(label, url=url, started=bool(pids))
    client = openai.AsyncOpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                                max_retries=0, timeout=600.0)
    model = await _model_id(client, settings.served.model_id)

    async def one(_lane: int, prompt: str, into: list[Sample] | None = phase.samples) -> None:
        t0 = time.monotonic()
        times: list[float] = []
        usage = extension = finish = None
        estimate: float | None = None
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=messages_for(prompt), stream=True, temperature=0.0,
                max_tokens=args.max_tokens, stream_options={"include_usage": True})
            estimate = _float(raw.headers.get(ESTIMATE_HEADER))
            stream = raw.parse()
            async for chunk in stream:
                now = time.monotonic()
                if chunk.choices:
                    if chunk.choices[0].delta and chunk.choices[0].delta.content:
                        times.append(now)
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
                extension = (chunk.model_extra or {}).get("grokstack") or extension
        except openai.RateLimitError as exc:  # refused at the door: admission's verdict, kept
            if into is not None and (said := refusal_estimate(str(exc))) is not None:
                phase.admission.append(WaitSample(t0, said[0], True, said[1]))
            phase.errors.append(f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a failed request is reported, the run goes on
            phase.errors.append(f"{type(exc).__name__}: {exc}")
            return
        if not times:
            phase.errors.append(f"no content (finish_reason {finish})")
            return
        if into is None:
            return
        if usage is None:
            phase.missing_usage += 1
        tokens = usage.completion_tokens if usage else 0
        into.append(Sample(times[0] - t0, time.monotonic() - t0, tokens, itl_gaps(times, tokens, finish),
                           extension))
        if into is phase.samples and extension:  # the stack's answer: how long it really waited
            phase.admission.append(WaitSample(t0, DEFAULT_PRIORITY, False, estimate,
                                              measured_wait_s(extension.get("timings"))))

    try:
        await one(0, PROMPTS[0], into=None)  # warm-up
        if phase.errors:
            raise SystemExit(f"the warm-up request to {url} failed: {phase.errors[0]}")
        with RssSampler(pids) as rss:
            await probe(phase, args, one)
            gauge = EdgeWaits(metrics_url, 0.0, 0.0)  # the edge's estimate, for answers without the header
            phase.gauge_t0 = time.monotonic()
            gauge.start()
            try:
                phase.wall_s = await drive(args.concurrency, args.requests, one)
            finally:
                await gauge.stop()
            phase.gauge = gauge.samples
        phase.peak_rss_gib = rss.peak_gib
    finally:
        await client.close()
    return phase


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def admission_samples(phase: TargetPhase) -> list[WaitSample]:
    """The phase's requests as admission saw them, each with an estimate where one is known."""
    return [s if s.estimated_s is not None or not phase.gauge else
            WaitSample(s.at, s.priority, s.refused, gauge_at(phase.gauge, s.at - phase.gauge_t0, s.priority),
                       s.measured_s) for s in phase.admission]


async def run_target(target: str, settings: Settings, args: argparse.Namespace) -> TargetPhase:
    metrics_url: str | None = None  # the edge's, for a stack this command starts
    with Supervisor() as supervisor:  # what it starts is stopped before the next target starts
        if target == "vllm":
            url, log = start_vllm(supervisor, settings)
        elif target.startswith("stack"):
            mode = target.partition(":")[2] or settings.stack.serving_mode
            log = log_file(settings, f"stack-{mode}")
            stack = start_stack(supervisor, settings.replace(serving_mode=mode), log, settings.edge.api_port)
            url, metrics_url = stack.api_url, stack.metrics_url
        else:
            url = target
        pids = [child.pid for child in supervisor.children()]
        if pids:
            print(f"{target}: up at {url} (log {log}); measuring", file=sys.stderr, flush=True)
        return await openai_phase(label_for(target), url, settings, args, pids, metrics_url)


# --- the report ---

def _num(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def _ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else NAN


def targets_report(phases: list[TargetPhase], failed: list[str], args: argparse.Namespace,
                   budgets: dict[str, float] | None = None) -> str:
    """The side-by-side table; with the priorities' queue `budgets`, admission's check per target."""
    ms, n = 1000.0, args.concurrency
    rows = [("TTFT p50, one at a time (ms)", lambda p: p.probe_ttft(0.5) * ms, True),
            (f"TTFT p50, {n} at once (ms)", lambda p: p.ttft(0.5) * ms, True),
            (f"TTFT p95, {n} at once (ms)", lambda p: p.ttft(0.95) * ms, True),
            ("ITL p50 (ms/token)", lambda p: p.itl_p50() * ms, True),
            (f"output tokens/s, {n} at once", lambda p: p.tokens_per_s(), True),
            ("requests ok", lambda p: float(len(p.samples)), False),
            ("peak resident memory (GiB)", lambda p: p.peak_rss(), True)]
    out = [f"\n{args.probe} short prompts one at a time ({args.think_s:g} s apart), then {args.requests} requests "
           f"{n} at once; max_tokens {args.max_tokens}, temperature 0, openai SDK streaming, {os.cpu_count()} cores"]
    out += [f"  {p.name}: {p.url}{' (started and stopped by this command)' if p.started else ''}" for p in phases]
    out += [f"  {f}" for f in failed]
    if not phases:
        return "\n".join(out)
    first, others = phases[0], phases[1:]
    cols = [p.name for p in phases] + [f"{first.name}/{o.name}" for o in others]
    widths = [max(12, len(c) + 2) for c in cols]
    out.append(f"{'':<34}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)))
    for name, f, ratio in rows:
        cells = [_num(f(p)) for p in phases]
        cells += [_num(_ratio(f(first), f(o)), 2) if ratio else "" for o in others]
        out.append(f"{name:<34}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    for p in phases:
        if p.errors:
            out.append(f"{p.name} errors: {len(p.errors)}: {p.errors[:3]}")
        if p.missing_usage:
            out.append(f"{p.name}: {p.missing_usage} responses carried no usage, so its tokens/s is not known")
    out += goal_lines(phases, args)
    for p in phases:
        if p.admission and budgets:
            out += [f"\n{p.name}:", *wait_lines(admission_samples(p), budgets)]
    for p in phases:
        for label, samples in (("one at a time", p.probe), (f"{n} at once", p.samples)):
            out += breakdown(f"{p.name}, {label}", [s.done for s in samples if s.done])
    return "\n".join(out)


def goal_lines(phases: list[TargetPhase], args: argparse.Namespace) -> list[str]:
    """Issue 4: the stack (or the first target) against vLLM's own server, under the same load."""
    vllm = next((p for p in phases if p.name == "vllm"), None)
    subjects = [p for p in phases if p.name.startswith("stack")] or phases[:1]
    if vllm is None:
        return []

    def verdict(ratio: float, ok: bool) -> str:
        return f"{_num(ratio, 2)}x {'MET' if ok else 'MISSED'}" if ratio == ratio else "n/a (not measured)"

    out = [""]
    for subject in [s for s in subjects if s is not vllm]:
        tps = _ratio(subject.tokens_per_s(), vllm.tokens_per_s())
        ttft = _ratio(subject.ttft(0.5), vllm.ttft(0.5))
        out.append(f"goal vs vllm ({subject.name}, {args.concurrency} at once): tokens/s >= 1.0x: "
                   f"{verdict(tps, tps >= 1.0)}; TTFT p50 <= 1.2x: {verdict(ttft, ttft <= 1.2)}")
    return out


async def run_targets(settings: Settings, args: argparse.Namespace) -> int:
    if args.url or args.skip_direct:
        raise SystemExit("--url and --skip-direct apply only without --target (give the URL as a --target)")
    phases: list[TargetPhase] = []
    failed: list[str] = []
    for target in parse_targets(args.target):
        try:
            phases.append(await run_target(target, settings, args))
        except Stopped:
            raise
        except (SystemExit, Exception) as exc:  # noqa: BLE001 - report it and go on with the next target
            failed.append(f"{label_for(target)}: FAILED, not measured: {exc}")
            print(failed[-1], file=sys.stderr, flush=True)
    budgets = {p: policy.queue_budget_s for p, policy in settings.priorities.table().items()}
    print(targets_report(phases, failed, args, budgets))
    return 1 if failed or any(p.errors for p in phases) else 0
