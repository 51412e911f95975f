"""`grokstack chaos`: a reliability drill (a script that prints a report, not a test).

It runs its own stack (embedded nats-server and Redis, one edge, prefill and decode workers with
the real vLLM engine, or with `--engine sim` simulated engines with vLLM's step times, each a
separate process), keeps a number of greedy chats going for a fixed time, and meanwhile kills
things at random: a decode worker (SIGKILL, while a spare is running), a prefill worker (SIGKILL),
the nats-server (SIGKILL, back a moment later on the same port and store) and Redis (SIGKILL, back
empty). Killed workers are replaced a little later, as a new pod would be.

Its clients behave like real ones: each chat lane asks at one priority (round robin over
`--priorities`), and after a refusal it waits the edge's `retry_after_s` plus jitter before asking
again; after a failure that gives none, it backs off exponentially (services/lab/common.py).

Then it reports what the clients saw: requests sent, completed, refused (the edge said "not now"
with a retry-after: not a failure of the stack), failed with a clear error, lost (no answer at
all: must be 0), duplicated or missing tokens (must be 0), answers that differ from an undisturbed
run of the same prompt, the latency a decode-worker migration added, and for each fault how long
each priority was refused after it (from its first refusal to its first acceptance again).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bus.priorities import PRIORITIES
from edge.client import EdgeClient
from services.lab.common import REFUSALS, quantile, retry_delay, run_drill
from services.lab.common import token_faults as common_token_faults
from services.lab.chaos_cluster import Cluster
from services.lab.chaos_regions import add_region_chaos_arguments, run_region_chaos
from services.settings import Settings

REFERENCE_TRIES = 10  # refusals before the drill (the stack still starting) before giving up

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in three sentences.",
    "List five fruits and their colours.",
    "Tell me a story about a clockmaker who builds a mechanical bird.",
    "What is the capital of France, and why is it famous?",
    "Give me three tips for writing clear emails.",
    "Describe how a bicycle works to a child.",
    "Why is the sky blue? Answer briefly.",
]


def add_chaos_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load and faults")
    parser.add_argument("--concurrency", type=int, default=6, help="chats in flight at once")
    parser.add_argument("--every", type=float, default=25.0, help="mean seconds between faults")
    parser.add_argument("--faults", default="decode,prefill,nats,redis",
                        help="comma-separated kinds of fault to inject")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--prefill-workers", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--replace-after", type=float, default=10.0,
                        help="seconds from killing a worker to starting its replacement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=["vllm", "sim"], default="vllm",
                        help="the workers' engines: the real vLLM, or simulated with vLLM's step times")
    parser.add_argument("--priorities", default=",".join(PRIORITIES),
                        help="comma-separated priorities the chat lanes ask at, round robin")
    parser.add_argument("--workdir", default="", help="keep servers' data and logs here (default: a temp dir)")
    add_region_chaos_arguments(parser)


@dataclass
class Outcome:
    prompt: int
    started: float
    priority: str = ""  # "" when the tenant's default
    request_id: str = ""
    accepted_at: float = 0.0  # monotonic, 0 when never accepted
    token_frames: list[tuple[int, int]] = field(default_factory=list)  # (seq, tokens) of each token frame
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    status: str = "lost"  # completed | refused | error | lost
    code: str = ""
    retry_after_s: float | None = None
    completion_tokens: int = -1


@dataclass
class Fault:
    kind: str
    at: float
    target: str


async def one_request(client: EdgeClient, prompt: int, max_tokens: int, deadline_s: float,
                      priority: str | None = None) -> Outcome:
    outcome = Outcome(prompt, time.monotonic(), priority or "")

    async def follow() -> None:
        async for frame in client.stream([{"role": "user", "content": PROMPTS[prompt]}],
                                         max_tokens=max_tokens, temperature=0, priority=priority):
            if frame["type"] == "accepted":
                outcome.request_id, outcome.accepted_at = frame["request_id"], time.monotonic()
            elif frame["type"] == "token":
                outcome.token_frames.append((frame["seq"], frame["tokens"]))
                outcome.token_times.append(time.monotonic())
                outcome.text += frame["text"]
            elif frame["type"] == "done":
                outcome.status, outcome.completion_tokens = "completed", frame["usage"]["completion_tokens"]
            elif frame["type"] == "error":
                code, outcome.retry_after_s = frame["code"], frame.get("retry_after_s")
                refused = not outcome.accepted_at and code in REFUSALS and outcome.retry_after_s is not None
                outcome.status = "lost" if code == "connection_closed" else "refused" if refused else "error"
                outcome.code = code
    try:
        await asyncio.wait_for(follow(), deadline_s)
    except asyncio.TimeoutError:
        outcome.status, outcome.code = "lost", "no answer before the client's deadline"
    return outcome


async def chat_loop(url: str, args: argparse.Namespace, stop_at: float, deadline_s: float,
                    rng: random.Random, outcomes: list[Outcome], priority: str) -> None:
    """One user at a time on one connection, asking again as a real client does: after a refusal
    once its retry-after (plus jitter) has passed, after a failure with backoff."""
    client: EdgeClient | None = None
    failures = 0  # in a row, for the backoff
    try:
        while time.monotonic() < stop_at:
            if client is None:
                try:
                    client = await EdgeClient.connect(url)
                except OSError:  # the edge is not there (yet): back off as after any failure
                    failures += 1
                    await asyncio.sleep(min(retry_delay(None, failures, rng), max(0.0, stop_at - time.monotonic())))
                    continue
            outcome = await one_request(client, rng.randrange(len(PROMPTS)), args.max_tokens, deadline_s, priority)
            outcomes.append(outcome)
            if outcome.code == "connection_closed":
                await client.close()
                client = None
            if outcome.status == "completed":
                failures = 0
                continue
            failures += outcome.status != "refused"
            wait = retry_delay(outcome.retry_after_s if outcome.status == "refused" else None, failures, rng)
            await asyncio.sleep(min(wait, max(0.0, stop_at - time.monotonic())))
    finally:
        if client is not None:
            await client.close()


async def fault_loop(cluster: Cluster, args: argparse.Namespace, stop_at: float, rng: random.Random,
                     faults: list[Fault]) -> None:
    """Faults at random times, of kinds in shuffled rounds so that each kind comes up as often;
    a kind that may not happen now (no spare decode worker yet) waits for the next turn."""
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    due: list[str] = []
    while True:
        await asyncio.sleep(rng.expovariate(1.0 / args.every))
        if time.monotonic() >= stop_at:
            return
        if not due:
            due = rng.sample(kinds, len(kinds))
        for kind in list(due):
            target, at = await asyncio.to_thread(cluster.inject, kind)
            if target:
                due.remove(kind)
                faults.append(Fault(kind, at, target))
                when = time.strftime('%H:%M:%S', time.localtime(time.time() - (time.monotonic() - at)))
                print(f"  {when} fault: {kind} ({target})", flush=True)
                break


async def references(url: str, max_tokens: int, rng: random.Random) -> dict[int, str]:
    """Each prompt answered once before any fault: what an undisturbed run says. Refusals are
    retried as the drill's clients do (the edge may be ready before it has heard the workers)."""
    async with await EdgeClient.connect(url) as client:
        out = {}
        for i in range(len(PROMPTS)):
            for _ in range(REFERENCE_TRIES):
                result = await one_request(client, i, max_tokens, 300)
                if result.status != "refused":
                    break
                await asyncio.sleep(retry_delay(result.retry_after_s, 1, rng))
            if result.status != "completed":
                raise SystemExit(f"the stack did not answer before the drill: {result.code}")
            out[i] = result.text
        return out


def migration_delays(outcomes: list[Outcome], migrated: set[str], faults: list[Fault]) -> list[float]:
    """For each answer that moved to another decode worker after a decode kill: the pause
    between its tokens across the kill minus its usual pause (ms)."""
    kills = [f.at for f in faults if f.kind == "decode"]
    delays = []
    for o in outcomes:
        if o.request_id not in migrated or len(o.token_times) < 3:
            continue
        gaps = [b - a for a, b in zip(o.token_times, o.token_times[1:], strict=False)]
        across = [i for i in range(len(gaps)) for at in kills if o.token_times[i] <= at <= o.token_times[i + 1]]
        if across:
            delays.append((gaps[across[0]] - statistics.median(gaps)) * 1000)
    return delays


def token_faults(o: Outcome) -> tuple[int, int]:
    return common_token_faults(o.token_frames, o.status == "completed", o.completion_tokens)


def refused_after(outcomes: list[Outcome], faults: list[Fault], end: float) -> list[str]:
    """For each fault and priority: from the first refusal after the fault (before the next one) to
    the first request of that priority accepted after that refusal."""
    lines = []
    priorities = sorted({o.priority for o in outcomes}, key=lambda p: (PRIORITIES + ("",)).index(p))
    for n, fault in enumerate(faults):
        until = faults[n + 1].at if n + 1 < len(faults) else end
        cells = []
        for priority in priorities:
            mine = [o for o in outcomes if o.priority == priority]
            refusals = sorted(o.started for o in mine if o.status == "refused" and fault.at <= o.started < until)
            if not refusals:
                cells.append(f"{priority or 'default'} not refused")
                continue
            back = min((o.accepted_at for o in mine if o.accepted_at > refusals[0]), default=None)
            span = f"{back - refusals[0]:.1f} s" if back is not None else "until the end"
            cells.append(f"{priority or 'default'} {span} ({len(refusals)} refusals)")
        lines.append(f"  +{fault.at - faults[0].at:5.0f} s {fault.kind:8s} refused: {'; '.join(cells)}")
    return lines


def report(args: argparse.Namespace, outcomes: list[Outcome], refs: dict[int, str], faults: list[Fault],
           migrated: set[str], seconds: float) -> bool:
    completed = [o for o in outcomes if o.status == "completed"]
    refused = [o for o in outcomes if o.status == "refused"]
    errors = [o for o in outcomes if o.status == "error"]
    lost = [o for o in outcomes if o.status == "lost"]
    duplicated = sum(token_faults(o)[0] for o in outcomes)
    missing = sum(token_faults(o)[1] for o in outcomes)
    differ = [o for o in completed if o.text != refs[o.prompt]]
    delays = migration_delays(outcomes, migrated, faults)
    by_kind = {k: sum(f.kind == k for f in faults) for k in sorted({f.kind for f in faults})}
    codes = count_codes(errors)
    engine = "vLLM" if args.engine == "vllm" else "simulated engines"
    lines = [
        f"chaos drill: {seconds:.0f} s, {args.concurrency} concurrent greedy chats of {args.max_tokens} tokens "
        f"({', '.join(sorted({o.priority or 'default' for o in outcomes}))}), "
        f"{args.prefill_workers} prefill + {args.decode_workers} decode workers ({engine})",
        f"faults injected          {len(faults)}  ({', '.join(f'{k} x{n}' for k, n in by_kind.items()) or 'none'})",
        f"requests sent            {len(outcomes)}",
        f"completed                {len(completed)}",
        f"refused, retry-after     {len(refused)}  {count_codes(refused) or ''}".rstrip()
        + "  (not failures: the edge said when to come back, and the client did, with jitter)",
        f"failed, clear error      {len(errors)}  {codes if codes else ''}".rstrip(),
        f"lost                     {len(lost)}  (must be 0)",
        f"duplicated tokens        {duplicated}  (must be 0)",
        f"missing tokens           {missing}  (must be 0)",
        f"differ from undisturbed  {len(differ)} of {len(completed)} completed",
        f"migrated answers         {len(migrated)}",
        f"migration added latency  n={len(delays)} p50 {quantile(delays, 0.5):.0f} ms, "
        f"p95 {quantile(delays, 0.95):.0f} ms, max {max(delays, default=float('nan')):.0f} ms "
        f"(goal: p95 under 1000 ms with a spare running)",
    ]
    for o in lost[:5]:
        lines.append(f"  lost: request {o.request_id or '(not accepted)'}: {o.code}")
    if faults:
        lines.append("refused after each fault (first refusal to first acceptance again, per priority):")
        lines += refused_after(outcomes, faults, max((o.started for o in outcomes), default=faults[-1].at))
    print("\n".join(lines), flush=True)
    return not lost and duplicated == 0 and missing == 0


def count_codes(outcomes: list[Outcome]) -> dict[str, int]:
    codes: dict[str, int] = {}
    for o in outcomes:
        codes[o.code] = codes.get(o.code, 0) + 1
    return codes


async def drill(args: argparse.Namespace, cluster: Cluster) -> bool:
    rng = random.Random(args.seed)
    url = cluster.edge_url
    print("reference answers (no faults yet) ...", flush=True)
    refs = await references(url, args.max_tokens, random.Random(args.seed))
    print(f"drill: {args.duration:.0f} s", flush=True)
    t0 = time.monotonic()
    stop_at = t0 + args.duration
    outcomes: list[Outcome] = []
    faults: list[Fault] = []
    deadline_s = cluster.settings.edge.request_timeout_s + 30
    priorities = [p.strip() for p in args.priorities.split(",") if p.strip()]
    chats = [asyncio.create_task(chat_loop(url, args, stop_at, deadline_s, random.Random(args.seed + i), outcomes,
                                           priorities[i % len(priorities)]))
             for i in range(args.concurrency)]
    injector = asyncio.create_task(fault_loop(cluster, args, stop_at, rng, faults))
    await asyncio.gather(*chats)
    injector.cancel()
    await asyncio.gather(injector, return_exceptions=True)
    return report(args, outcomes, refs, faults, cluster.migrated_requests(), time.monotonic() - t0)


def run_chaos(settings: Settings, args: argparse.Namespace) -> int:
    if settings.stack.regions:  # whole regions die and come back, with simulated engines
        return run_region_chaos(settings, args)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="grokstack-chaos-"))
    priorities = [p.strip() for p in args.priorities.split(",") if p.strip()]
    unknown = [p for p in priorities if p not in PRIORITIES]
    if unknown or not priorities:
        raise SystemExit(f"--priorities must name some of {', '.join(PRIORITIES)}; got {args.priorities!r}")
    cluster = Cluster(settings, workdir, args.prefill_workers, args.decode_workers, random.Random(args.seed),
                      args.replace_after, engine=args.engine)
    return run_drill(cluster, workdir, "starting the stack", lambda: drill(args, cluster))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as `grokstack chaos`")
