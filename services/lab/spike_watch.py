"""What the spike bench watches besides its answers: the CPU its processes use (a simulated fleet
on 2 cores is only faithful while it has CPU to spare), and the edge's estimated queue wait,
admission control's input, next to what the requests then really waited."""

from __future__ import annotations

import asyncio
import os
import time

import psutil

from services.lab.cost_metrics import ScrapeError, fetch
from services.lab.spike_client import PHASES


def _tree_cpu_s(pid: int, children: bool = True) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *(root.children(recursive=True) if children else [])]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class CpuUse:
    """CPU seconds of named process trees, of this process alone (the client: the others are
    its children) and of the whole machine, between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {"client": os.getpid(), **pids}
        self._t0 = 0.0
        self._start: dict[str, float] = {}
        self._machine = psutil.cpu_times()
        self.cores: dict[str, float] = {}
        self.machine_busy = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = {n: self._cpu_s(n) for n in self.pids}
        self._machine = psutil.cpu_times()

    def stop(self) -> None:
        wall = max(1e-9, time.monotonic() - self._t0)
        self.cores = {n: (self._cpu_s(n) - self._start[n]) / wall for n in self.pids}
        after = psutil.cpu_times()
        idle = (after.idle + getattr(after, "iowait", 0)) - (self._machine.idle + getattr(self._machine, "iowait", 0))
        total = sum(after) - sum(self._machine)
        self.machine_busy = 1 - idle / total if total > 0 else 0.0

    def _cpu_s(self, name: str) -> float:
        return _tree_cpu_s(self.pids[name], children=name != "client")

    def describe(self) -> str:
        ours = sum(self.cores.values())
        parts = ", ".join(f"{n} {c:.2f}" for n, c in self.cores.items())
        warn = " (nearly saturated: simulated step times stretch; lower the rates)" if self.machine_busy > 0.9 else ""
        return (f"CPU during the load: the bench's processes used {ours:.2f} of {psutil.cpu_count()} cores ({parts}); "
                f"machine busy {self.machine_busy:.0%}, other processes included{warn}")


class EdgeWaits:
    """Samples the edge's estimated queue wait per priority from its /metrics, once a second."""

    def __init__(self, metrics_url: str | None, steady_s: float, spike_s: float) -> None:
        self.url = metrics_url
        self.bounds = (steady_s, steady_s + spike_s)
        self.samples: list[tuple[float, str, float]] = []  # (seconds into the load, priority, estimate)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.url:
            self._task = asyncio.get_running_loop().create_task(self._run(time.monotonic()))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, t0: float) -> None:
        while True:
            try:
                samples, _ = await asyncio.to_thread(fetch, self.url, 2.0)
                now = time.monotonic() - t0
                self.samples += [(now, dict(labels)["priority"], value) for (name, labels), value in samples.items()
                                 if name == "grokstack_queue_wait_estimate_seconds"]
            except ScrapeError:
                pass  # the next sample will do
            await asyncio.sleep(1.0)

    def phase_of(self, t: float) -> str:
        return PHASES[0] if t < self.bounds[0] else PHASES[1] if t < self.bounds[1] else PHASES[2]

    def peaks(self, priority: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {ph: None for ph in PHASES}
        for t, p, v in self.samples:
            ph = self.phase_of(t)
            if p == priority:
                out[ph] = max(v, out[ph] or 0.0)
        return out

    def describe(self, budgets: dict[str, float], priorities: tuple[str, ...]) -> str:
        if not self.samples:
            return "edge's estimated queue wait: not available (no queue-wait metric read from the edge)"
        rows = []
        for p in priorities:
            peaks = self.peaks(p)
            rows.append(f"{p} " + "/".join("-" if peaks[ph] is None else f"{peaks[ph]:.1f}" for ph in PHASES)
                        + f" s (budget {budgets[p]:g} s)")
        return ("edge's estimated queue wait (admission's input), peak before/during/after: " + "; ".join(rows))
