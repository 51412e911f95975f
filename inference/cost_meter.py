"""What each request costs in accelerator time.

A worker's engine runs its jobs together (continuous batching), so a job's cost is its share of
the engine's busy time, not its wall time. Between two changes of the running set (a job starts
or ends) the set is fixed, so the time is split there exactly, by weight: a prefill job weighs
the prompt tokens it computes (a long prompt costs more of a prefill batch), a decoding
sequence weighs 1 (each step gives every sequence one token).

Priced: seconds x accelerators per worker x price per accelerator-hour / 3600.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bus.messages import Cost
from inference.config import WorkerConfig


@dataclass
class _Share:
    weight: float
    seconds: float = 0.0


class GpuClock:
    def __init__(self, usd_per_gpu_s: float, clock=time.monotonic) -> None:
        self.usd_per_gpu_s = usd_per_gpu_s
        self._clock = clock
        self._jobs: dict[str, _Share] = {}
        self._at = clock()
        self.busy_s = 0.0  # wall time with at least one job running
        self.job_s = 0.0  # running jobs integrated over time (mean occupancy = job_s / busy_s)

    @classmethod
    def of(cls, config: WorkerConfig) -> "GpuClock":
        return cls(config.gpu_price_per_hour * config.gpus_per_worker / 3600)

    def tick(self) -> None:
        now = self._clock()
        dt, self._at = now - self._at, now
        total = sum(j.weight for j in self._jobs.values())
        if not self._jobs or dt <= 0:
            return
        self.busy_s += dt
        self.job_s += dt * len(self._jobs)
        for job in self._jobs.values():
            job.seconds += dt * job.weight / total if total else dt / len(self._jobs)

    def start(self, job_id: str, weight: float = 1.0) -> None:
        self.tick()
        self._jobs[job_id] = _Share(max(0.0, weight))

    def reweigh(self, job_id: str, weight: float) -> None:
        """A job changes phase (an aggregated worker's prompt is done, it decodes now)."""
        self.tick()
        if job_id in self._jobs:
            self._jobs[job_id].weight = max(0.0, weight)

    def seconds(self, job_id: str) -> float:
        """The job's accelerator-seconds so far."""
        self.tick()
        job = self._jobs.get(job_id)
        return job.seconds if job else 0.0

    def stop(self, job_id: str) -> float:
        self.tick()
        job = self._jobs.pop(job_id, None)
        return job.seconds if job else 0.0

    def usd(self, gpu_s: float) -> float:
        return round(gpu_s * self.usd_per_gpu_s, 9)

    def price(self, prefill_gpu_s: float, decode_gpu_s: float, prefill_usd: float | None = None) -> Cost:
        """The request's cost; `prefill_usd` when another pool (at its own price) prefilled it."""
        usd = (self.usd(prefill_gpu_s) if prefill_usd is None else prefill_usd) + self.usd(decode_gpu_s)
        return Cost(prefill_gpu_s=round(prefill_gpu_s, 6), decode_gpu_s=round(decode_gpu_s, 6),
                    usd=round(usd, 9))
