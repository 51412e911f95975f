"""`grokstack chaos --regions a,b,c`: a drill of whole regions dying, coming back, being cut off
and healing, while chats go on (a script that prints a report, not a test).

Each region runs its own servers, an edge and simulated workers (services/lab/region_cluster.py);
a WAN delay separates the regions. Clients are spread over the regions' edges; each keeps every
edge's URL, its own first, and carries on through another when its edge goes away (resume by
request id, or resubmit when no region knows the request). Meanwhile, at random: a region killed
whole (SIGKILL of every process and server) and restored `--down` seconds later, or cut off from the
others and healed. At least one region stays whole.

The report: requests sent, completed, failed with a clear error, lost (must be 0), duplicated and
missing tokens (must be 0), failover detection time (the edges' takeover log lines) and the token
gap a client saw across a region's death (p50/p95), the time to first token of requests served at
home and in another region, and wasted work: late events of superseded attempts the edges dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from edge.client import RegionalClient
from services.lab.common import quantile, run_drill
from services.lab.common import token_faults as common_token_faults
from services.lab.region_cluster import RegionCluster
from services.settings import Settings

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in three sentences.",
    "Tell me a story about a clockmaker who builds a mechanical bird.",
    "Describe how a bicycle works to a child.",
]


def add_region_chaos_arguments(parser: argparse.ArgumentParser) -> None:
    """The drill's own options; the regions and the delay between them are the settings'
    `--regions` and `--wan-delay-ms` (as for `grokstack up`)."""
    g = parser.add_argument_group("regions (with --regions a,b,c: the region drill)")
    g.add_argument("--region-workers", type=int, default=2, help="simulated workers per role in each region")
    g.add_argument("--down", type=float, default=8.0, help="seconds a killed or cut-off region stays so")


@dataclass
class Outcome:
    home: str
    started: float
    request_id: str = ""
    token_frames: list[tuple[int, int]] = field(default_factory=list)  # (seq, tokens) of each token frame
    token_times: list[float] = field(default_factory=list)
    status: str = "lost"  # completed | error | lost
    code: str = ""
    completion_tokens: int = -1
    region: str = ""  # where it finished
    route: str = ""
    first_region: str = ""  # where it was first accepted
    ttft_s: float = 0.0
    resubmitted: bool = False


@dataclass
class Fault:
    kind: str  # kill | cut
    region: str
    at: float
    back_at: float = 0.0


async def one_request(client: RegionalClient, home: str, rng: random.Random, max_tokens: int,
                      deadline_s: float, far: str | None) -> Outcome:
    """One greedy chat; `far`: a region to ask for (served there, its tokens crossing the WAN)."""
    outcome = Outcome(home, time.monotonic())

    async def follow() -> None:
        prompt = PROMPTS[rng.randrange(len(PROMPTS))]
        async for frame in client.stream([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                         temperature=0, region=far):
            kind = frame["type"]
            if kind == "accepted":
                outcome.request_id = frame["request_id"]
                outcome.first_region = outcome.first_region or frame.get("region", "")
            elif kind == "token":
                if not outcome.token_times:
                    outcome.ttft_s = time.monotonic() - outcome.started
                outcome.token_frames.append((frame["seq"], frame["tokens"]))
                outcome.token_times.append(time.monotonic())
            elif kind == "done":
                usage = frame["usage"]
                outcome.status, outcome.completion_tokens = "completed", usage["completion_tokens"]
                outcome.region, outcome.route = usage.get("region", ""), usage.get("route", "")
            elif kind == "resubmitted":  # no region knew it: sent again, tokens shown kept
                outcome.resubmitted = True
            elif kind == "error":
                outcome.status, outcome.code = "error", frame["code"]
    try:
        await asyncio.wait_for(follow(), deadline_s)
    except asyncio.TimeoutError:
        outcome.status, outcome.code = "lost", "no answer before the client's deadline"
    except Exception as exc:  # every edge unreachable for the client's whole patience
        outcome.status, outcome.code = "lost", f"{type(exc).__name__}: {exc}"
    return outcome


async def chat_loop(cluster: RegionCluster, home: str, args: argparse.Namespace, stop_at: float,
                    rng: random.Random, outcomes: list[Outcome]) -> None:
    urls = [cluster.edge_url(home), *(cluster.edge_url(r) for r in cluster.regions if r != home)]
    client = RegionalClient(urls)
    others = [r for r in cluster.regions if r != home]
    try:
        while time.monotonic() < stop_at:
            # one chat in four asks for another region: cross-region traffic for the faults to hit
            far = rng.choice(others) if rng.random() < 0.25 else None
            outcomes.append(await one_request(client, home, rng, args.max_tokens, 120.0, far))
    finally:
        await client.close()


async def fault_loop(cluster: RegionCluster, args: argparse.Namespace, stop_at: float, rng: random.Random,
                     faults: list[Fault]) -> None:
    """Kills and cuts in shuffled rounds, so that each comes up as often, of a region chosen at random."""
    due: list[str] = []
    while True:
        await asyncio.sleep(rng.expovariate(1.0 / args.every))
        if time.monotonic() + args.down >= stop_at:
            return
        whole = [r for r in cluster.regions if r not in cluster.down and r not in cluster.cut]
        if len(whole) < 2:
            continue
        due = due or rng.sample(["kill", "cut"], 2)
        fault = Fault(due.pop(), rng.choice(whole), time.monotonic())
        faults.append(fault)
        print(f"  {time.strftime('%H:%M:%S')} {fault.kind} region {fault.region}", flush=True)
        await asyncio.to_thread(cluster.kill if fault.kind == "kill" else cluster.isolate, fault.region)
        await asyncio.sleep(args.down)
        await asyncio.to_thread(cluster.restore if fault.kind == "kill" else cluster.rejoin, fault.region)
        fault.back_at = time.monotonic()
        print(f"  {time.strftime('%H:%M:%S')} region {fault.region} back", flush=True)


def token_faults(o: Outcome) -> tuple[int, int]:
    return common_token_faults(o.token_frames, o.status == "completed", o.completion_tokens)


def gaps_at_deaths(outcomes: list[Outcome], faults: list[Fault]) -> dict[str, list[float]]:
    """For each stream that a region's death or cut hit while it ran, the longest pause between its
    tokens across that moment (what its client saw), by case: served in that region while the
    client's edge lived elsewhere (`served there`), or the client's own edge died with it
    (`edge died`: the client reconnects elsewhere and resumes), and of those, the ones no region
    knew any more (`resubmitted`: asked again, the tokens shown regenerated first)."""
    out: dict[str, list[float]] = {"served there": [], "edge died": [], "resubmitted": []}
    for o in outcomes:
        times = o.token_times
        for f in faults:
            across = [b - a for a, b in zip(times, times[1:], strict=False) if a <= f.at <= b]
            if not across:
                continue
            if f.kind == "kill" and o.home == f.region:
                out["resubmitted" if o.resubmitted else "edge died"].append(max(across))
            elif o.first_region == f.region and o.home != f.region:  # a cut leaves home traffic alone
                out["served there"].append(max(across))
    return out


def takeovers(cluster: RegionCluster) -> dict[str, list[float]]:
    """The edges' takeovers by cause (edge logs): for a dead region, the seconds from its last beat to
    its request published elsewhere; for a client that moved, since its region's last beat."""
    found: dict[str, list[float]] = {"region_dead": [], "client_moved": []}
    for region in cluster.regions:
        log = cluster.logs(region) / "edge.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            if "request taken over by another region" in line:
                try:
                    record = json.loads(line)
                    found[record["cause"]].append(float(record["detected_after_s"]))
                except (ValueError, KeyError):
                    continue
    return found


def stale_events(cluster: RegionCluster) -> float:
    total = 0.0
    for region in cluster.regions:
        if region in cluster.down:
            continue
        try:
            with urllib.request.urlopen(cluster.edge_metrics(region), timeout=5) as r:
                body = r.read().decode()
        except OSError:
            continue
        total += sum(float(line.split()[-1]) for line in body.splitlines()
                     if line.startswith("grokstack_stale_events_total"))
    return total


def report(args: argparse.Namespace, cluster: RegionCluster, outcomes: list[Outcome], faults: list[Fault],
           seconds: float) -> bool:
    completed = [o for o in outcomes if o.status == "completed"]
    errors = [o for o in outcomes if o.status == "error"]
    lost = [o for o in outcomes if o.status == "lost"]
    duplicated = sum(token_faults(o)[0] for o in outcomes)
    missing = sum(token_faults(o)[1] for o in outcomes)
    codes: dict[str, int] = {}
    for o in errors:
        codes[o.code] = codes.get(o.code, 0) + 1
    home = [o.ttft_s * 1000 for o in completed if o.route == "home" and o.ttft_s]
    away = [o.ttft_s * 1000 for o in completed if o.route == "requested" and o.ttft_s]
    gaps = gaps_at_deaths(outcomes, faults)
    taken = takeovers(cluster)
    detect = taken["region_dead"]
    routes: dict[str, int] = {}
    for o in completed:
        routes[o.route or "?"] = routes.get(o.route or "?", 0) + 1
    by_kind = {k: sum(f.kind == k for f in faults) for k in ("kill", "cut")}
    lines = [
        f"region drill: {seconds:.0f} s over regions {','.join(cluster.regions)} "
        f"({cluster.wan_delay_ms:g} ms one way), "
        f"{args.concurrency} chats of {args.max_tokens} tokens, {args.region_workers} simulated prefill + "
        f"{args.region_workers} decode workers per region (engines: simulated vLLM step times)",
        f"faults                   {len(faults)}  (regions killed x{by_kind['kill']}, cut off x{by_kind['cut']})",
        f"requests sent            {len(outcomes)}",
        f"completed                {len(completed)}  (finished by route: {routes})",
        f"failed, clear error      {len(errors)}  {codes if codes else ''}".rstrip(),
        f"lost                     {len(lost)}  (must be 0)",
        f"duplicated tokens        {duplicated}  (must be 0)",
        f"missing tokens           {missing}  (must be 0)",
        f"resubmitted by clients   {sum(o.resubmitted for o in outcomes)}  (no region knew the request)",
        f"takeover detection       n={len(detect)} p50 {quantile(detect, 0.5):.2f} s, "
        f"p95 {quantile(detect, 0.95):.2f} s (goal: under 1 s); and {len(taken['client_moved'])} taken over "
        "where their client resumed, its region dead",
        *(f"token gap, {case + ':':<13} n={len(g)} p50 {quantile(g, 0.5):.2f} s, p95 {quantile(g, 0.95):.2f} s, "
          f"max {max(g, default=float('nan')):.2f} s" for case, g in gaps.items()),
        "                         (goal: p95 under 1.5 s at a region's death)",
        f"time to first token      served at its edge's region n={len(home)} p50 {quantile(home, 0.5):.0f} ms; "
        f"in another region n={len(away)} p50 {quantile(away, 0.5):.0f} ms",
        f"wasted work              {stale_events(cluster):.0f} late events of superseded attempts dropped "
        "(edges still up at the end)",
    ]
    for o in lost[:5]:
        lines.append(f"  lost: request {o.request_id or '(not accepted)'} of a client of {o.home}: {o.code}")
    print("\n".join(lines), flush=True)
    return not lost and duplicated == 0 and missing == 0


async def drill(args: argparse.Namespace, cluster: RegionCluster) -> bool:
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    stop_at = t0 + args.duration
    outcomes: list[Outcome] = []
    faults: list[Fault] = []
    homes = [cluster.regions[i % len(cluster.regions)] for i in range(args.concurrency)]
    chats = [asyncio.create_task(chat_loop(cluster, home, args, stop_at, random.Random(args.seed + i), outcomes))
             for i, home in enumerate(homes)]
    injector = asyncio.create_task(fault_loop(cluster, args, stop_at, rng, faults))
    await asyncio.gather(*chats)
    injector.cancel()
    await asyncio.gather(injector, return_exceptions=True)
    # every request and fault, for a closer look than the report's
    (cluster.workdir / "outcomes.json").write_text(json.dumps(
        {"faults": [dataclasses.asdict(f) for f in faults], "outcomes": [dataclasses.asdict(o) for o in outcomes]}))
    return report(args, cluster, outcomes, faults, time.monotonic() - t0)


def run_region_chaos(settings: Settings, args: argparse.Namespace) -> int:
    regions = settings.stack.regions.split(",")
    if len(regions) < 2:
        print("grokstack chaos: --regions needs at least two regions", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="grokstack-regions-"))
    cluster = RegionCluster(settings, workdir, regions, settings.stack.wan_delay_ms, args.region_workers)
    return run_drill(cluster, workdir, f"starting {len(regions)} regions", lambda: drill(args, cluster))
