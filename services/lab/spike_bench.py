"""`grokstack bench --spike`: a steady load, a burst of --spike-x times it, steady again.

Open-loop Poisson arrivals with a mix of priorities, each with its own max_tokens, over websocket
connections to an edge (services/lab/spike_client.py); per priority and phase it prints what was
offered, served, refused (with the retry-after the edge gave), degraded and lost, and TTFT
(services/lab/spike_report.py). Two backends, and the report says which one ran:

  --engine sim   a simulated fleet (services/lab/sim_cluster.py): embedded NATS and Redis, one edge,
                 --prefill-workers and --decode-workers real workers whose engines are SimEngines
                 with vLLM's step times measured on this machine (`grokstack bench --calibrate`).
                 Queueing at fleet scale on 2 cores; the rates default to 35% of the fleet's
                 estimated capacity.
  --engine real  the real stack (vLLM) started with `grokstack up`, or the one at --url; small
                 rates, as 2 CPU cores serve about 0.4 requests per second of this mix.

Default mix: interactive 20%, standard 30%, batch 50%. Breaking news brings mostly machine
traffic (summaries, feeds, re-ranking: batch) on top of people chatting; batch is the largest
share so admission control has something to shed, and the smallest share is the one that must
stay fast.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.lab.sim_calibration import Calibration, calibration_file
from services.lab.common import PROMPTS, StartedStack, log_file, start_stack
from services.lab.sim_cluster import SimCluster
from services.settings import Settings
from services.supervisor import Supervisor
from services.lab.spike_client import Outcome, drive, schedule
from bus.priorities import PRIORITIES
from services.lab.spike_report import (WaitSample, as_json, goal, outcome_samples, precision, render, table,
                                       wait_lines)
from services.lab.spike_watch import CpuUse, EdgeWaits

# README's measurement of the disaggregated stack at 8 chats: 34.5 tokens/s on 2 cores, about
# 0.38 requests/s of the default mix (90 output tokens on average); 0.12/s is about a third.
REAL_RATE = 0.12
STEADY_SHARE = 0.35  # the sim's default steady load, as a share of its estimated capacity


def add_spike_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("burst benchmark (--spike)")
    g.add_argument("--spike", action="store_true", help="steady load, a burst, steady again: see --engine")
    g.add_argument("--engine", choices=["sim", "real"], default="sim",
                   help="sim: a simulated fleet with calibrated engines; real: the vLLM stack")
    g.add_argument("--rate", type=float, default=None,
                   help=f"steady arrivals per second (default: sim {STEADY_SHARE * 100:.0f}%% of the fleet's estimated "
                        f"capacity, real {REAL_RATE})")
    g.add_argument("--spike-x", type=float, default=10.0, help="the burst's rate as a multiple of --rate")
    g.add_argument("--steady-s", type=float, default=None, help="seconds of steady load before and after "
                                                                "(default: sim 30, real 60)")
    g.add_argument("--spike-s", type=float, default=30.0, help="seconds of burst")
    g.add_argument("--mix", default="interactive=0.2,standard=0.3,batch=0.5", help="share of each priority")
    g.add_argument("--interactive-tokens", type=int, default=32, help="max_tokens of interactive requests")
    g.add_argument("--standard-tokens", type=int, default=64)
    g.add_argument("--batch-tokens", type=int, default=128)
    g.add_argument("--prefill-workers", type=int, default=4, help="sim only")
    g.add_argument("--decode-workers", type=int, default=16, help="sim only")
    g.add_argument("--calibration", type=Path, default=None,
                   help="the sim's calibration JSON (default <data dir>/sim-calibration.json if it exists, "
                        "else the built-in constants); with --calibrate, where to write it")
    g.add_argument("--calibrate", action="store_true",
                   help="measure the real engine's step times and write the sim's calibration JSON")
    g.add_argument("--retry", type=int, nargs="?", const=3, default=0, metavar="N",
                   help="retry a refused request after its retry_after_s, up to N times (default 3); "
                        "retries are reported apart")
    g.add_argument("--drain-s", type=float, default=300.0,
                   help="after the last arrival, wait at most this long for answers (the edge's request timeout); "
                        "unanswered ones are lost")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")


def calibration_path(settings: Settings, args: argparse.Namespace) -> Path:
    return args.calibration or calibration_file(settings.stack.data_dir)


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        if name.strip() not in PRIORITIES:
            raise SystemExit(f"--mix: unknown priority {name.strip()!r} (interactive, standard, batch)")
        mix[name.strip()] = float(share)
    total = sum(mix.values())
    if total <= 0:
        raise SystemExit("--mix: the shares must add up to more than 0")
    return {k: v / total for k, v in mix.items()}


@dataclass
class Plan:
    engine: str
    rate: float
    spike_x: float
    steady_s: float
    spike_s: float
    mix: dict[str, float]
    max_tokens: dict[str, int]
    capacity: str  # how the steady rate was chosen

    def describe(self) -> list[str]:
        burst = self.rate * self.spike_x
        return [f"load: Poisson arrivals, {self.rate:.2f}/s for {self.steady_s:g} s, {burst:.2f}/s "
                f"({self.spike_x:g}x) for {self.spike_s:g} s, {self.rate:.2f}/s for {self.steady_s:g} s; "
                f"{self.capacity}",
                "mix: " + ", ".join(f"{p} {s:.0%} (max_tokens {self.max_tokens[p]})" for p, s in self.mix.items())
                + "; temperature 0"]


def sim_capacity(cal: Calibration, settings: Settings, args: argparse.Namespace,
                 mix: dict[str, float], max_tokens: dict[str, int]) -> tuple[float, str]:
    """Requests per second the simulated fleet serves, from the calibration: the lesser of what
    the prefill pool and the decode pool get through when every engine batches fully."""
    from bus.messages import ChatMessage
    from services.lab.sim_engine import SimEngine

    sim = SimEngine()
    prompt_bytes = sum(len(sim.render_chat([ChatMessage("user", f"#100: {p}")])) for p in PROMPTS) / len(PROMPTS)
    prompt = prompt_bytes * cal.tokens_per_prompt_byte
    slots = settings.engine.prefill_slots
    prefill = args.prefill_workers * slots / cal.step_s(slots, int(slots * prompt))
    tokens = sum(share * (max_tokens[p] - 1) for p, share in mix.items())
    decode = args.decode_workers * cal.tokens_per_s(settings.engine.decode_slots) / tokens
    capacity = min(prefill, decode)
    return capacity, (f"estimated capacity {capacity:.1f}/s (prefill pool {prefill:.1f}/s, decode pool "
                      f"{decode:.1f}/s), steady = {STEADY_SHARE:.0%} of it")


def make_plan(settings: Settings, args: argparse.Namespace, cal: Calibration) -> Plan:
    mix = parse_mix(args.mix)
    max_tokens = {"interactive": args.interactive_tokens, "standard": args.standard_tokens,
                  "batch": args.batch_tokens}
    if args.engine == "sim":
        capacity, how = sim_capacity(cal, settings, args, mix, max_tokens)
        rate = args.rate or STEADY_SHARE * capacity
    else:
        rate, how = args.rate or REAL_RATE, "2 cores serve about 0.38/s of the default mix (README bench)"
    if args.rate:
        how = f"steady rate given ({how.split(', steady')[0]})"
    steady = args.steady_s if args.steady_s is not None else (30.0 if args.engine == "sim" else 60.0)
    return Plan(args.engine, rate, args.spike_x, steady, args.spike_s, mix, max_tokens, how)


class Backend:
    """Where the load goes: a started simulated fleet, a started real stack, or a given URL."""

    def __init__(self, settings: Settings, args: argparse.Namespace, cal: Calibration, cal_file: Path | None):
        self.settings, self.args, self.cal, self.cal_file = settings, args, cal, cal_file
        self.supervisor = Supervisor()  # the real stack's `grokstack up`
        self.stack: StartedStack | None = None
        self.cluster: SimCluster | None = None
        self.workdir: Path | None = None

    def start(self) -> tuple[str, str]:
        """The edge's URL and a description of what serves it."""
        a = self.args
        if a.url:
            return a.url, f"engine {a.engine}: the running stack at {a.url} (not started here)"
        if a.engine == "real":
            self.stack = start_stack(self.supervisor, self.settings, log_file(self.settings, "stack-spike"))
            workers = ("1 aggregated worker" if self.settings.stack.serving_mode == "aggregated"
                       else "1 prefill + 1 decode worker sharing the cores")
            return self.stack.url, (
                f"engine real: vLLM ({self.settings.served.model_id}, CPU) through `grokstack up`, {workers}, "
                f"one edge, embedded NATS and Redis, on this machine")
        self.workdir = Path(tempfile.mkdtemp(prefix="grokstack-spike-"))
        self.cluster = SimCluster(self.settings, self.workdir, a.prefill_workers, a.decode_workers, self.cal_file)
        self.cluster.start()
        return self.cluster.edge_url, (
            f"engine sim: SIMULATED fleet of {a.prefill_workers} prefill + {a.decode_workers} decode workers "
            f"(real workers, bus and edge; SimEngine with calibrated vLLM step times; prefill slots "
            f"{self.settings.engine.prefill_slots}, decode slots {self.settings.engine.decode_slots}), one edge "
            f"standing for the fleet's edges (in-flight cap {self.cluster.settings.edge.max_inflight_per_edge}), "
            f"embedded NATS and Redis, "
            f"on this machine\ncalibration: {self.cal.describe()}")

    def processes(self) -> dict[str, int]:
        """Named process trees whose CPU the report shows, besides this one (the client)."""
        if self.stack is not None:
            return {"stack (grokstack up)": self.stack.child.pid}
        if self.cluster is not None:
            return self.cluster.processes()
        return {}

    def metrics_url(self) -> str | None:
        """The edge's Prometheus endpoint, on its metrics port, when this backend knows it."""
        if self.cluster is not None:
            return f"http://127.0.0.1:{self.cluster.edge_metrics_port}/metrics"
        if self.stack is not None:
            return self.stack.metrics_url
        return None

    def stop(self, keep_logs: bool) -> None:
        self.supervisor.stop_all()
        if self.cluster is not None:
            self.cluster.stop()
            if keep_logs:
                print(f"logs of the simulated fleet kept in {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


def budgets(settings: Settings) -> dict[str, float]:
    return {p: policy.queue_budget_s for p, policy in settings.priorities.table().items()}


def header(what: str, plan: Plan, url: str, settings: Settings, args: argparse.Namespace) -> str:
    retries = f"retried up to {args.retry} times after retry_after_s" if args.retry else "not retried"
    return "\n".join([f"grokstack bench --spike\n{what}", *plan.describe(),
                      f"client: open loop (seed {args.seed}), websocket connections to {url}, up to "
                      f"{settings.edge.max_inflight_per_connection} requests in flight on each; refusals {retries}"])


async def load(backend: Backend, url: str, plan: Plan, settings: Settings,
               args: argparse.Namespace) -> tuple[list[Outcome], CpuUse, EdgeWaits, list[WaitSample]]:
    arrivals = schedule(plan.rate, plan.spike_x, plan.steady_s, plan.spike_s, plan.mix, PROMPTS,
                        random.Random(args.seed))
    cpu = CpuUse(backend.processes())
    waits = EdgeWaits(backend.metrics_url(), plan.steady_s, plan.spike_s)
    cpu.start()
    waits_t0 = time.monotonic()  # the clock of its samples (EdgeWaits starts it now)
    waits.start()
    try:
        outcomes = await drive(url, arrivals, plan.max_tokens, settings.edge.max_inflight_per_connection,
                               args.retry, args.drain_s)
    finally:
        await waits.stop()
    cpu.stop()
    return outcomes, cpu, waits, outcome_samples(outcomes, waits.samples, waits_t0)


async def run_spike(settings: Settings, args: argparse.Namespace) -> int:
    cal_file = calibration_path(settings, args)
    cal = Calibration.load(cal_file)
    plan = make_plan(settings, args, cal)
    backend = Backend(settings, args, cal, cal_file if cal_file.exists() else None)
    lost, started = 0, False
    try:
        url, what = backend.start()
        started = True
        print(header(what, plan, url, settings, args), flush=True)
        outcomes, cpu, waits, admitted = await load(backend, url, plan, settings, args)
        cells = table(outcomes)
        verdict = goal(cells)
        lost = sum(row["all"].lost for row in cells.values())
        print("\n" + "\n".join(render(cells, outcomes, bool(args.retry))))
        print(waits.describe(budgets(settings), PRIORITIES))
        print("\n".join(wait_lines(admitted, budgets(settings))))
        print(cpu.describe())
        print(verdict.text)
        print(f"lost (accepted, no done frame): {lost} -> {'OK' if lost == 0 else 'FAILED'}")
        if args.json:
            args.json.write_text(json.dumps({
                "engine": plan.engine, "plan": plan.__dict__, "cpu_cores": cpu.cores,
                "machine_busy": cpu.machine_busy, "edge_wait_peaks_s": {p: waits.peaks(p) for p in PRIORITIES},
                "admission": {p: asdict(precision(admitted, p, budgets(settings)[p])) for p in PRIORITIES},
                **as_json(cells, verdict)}, indent=2, default=str) + "\n")
    finally:
        backend.stop(keep_logs=lost > 0 or not started)
    return 1 if lost else 0
