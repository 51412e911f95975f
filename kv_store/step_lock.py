"""Taking turns on a shared CPU: engines on one machine run one forward pass at a time.

A vLLM CPU engine runs each forward pass on an OpenMP team that spans every core. Two engines on
the same cores (a prefill and a decode worker on one machine, as `grokstack up` runs them) make
two teams fight over them: each team's barrier waits for a thread the other team has preempted,
and both slow down several-fold. With this lock the passes alternate instead, each with every core.

The KV connector is our code that runs in vLLM's model worker around every forward pass, so it
holds the lock from `bind_connector_metadata` (before the pass) to `clear_connector_metadata`
(after it). An flock on a file releases itself if the process dies. Off unless a path is given
(`grokstack up` gives one when engines share this machine's cores: services/up.py).

Turns must alternate: a bare flock lets the engine that just released take it straight back while
the other sleeps (measured: a TTFT p95 of 15 s at 8 streams). So a second lock, the gate, is held
while waiting for the first: an engine that wants the lock again finds the gate taken by the one
already waiting, and gets its turn only after that one has had its pass.

Waiting must not spin either. vLLM's scheduler process and its model worker hand each step over a
shared-memory queue whose reader spins (sched_yield) for a second after every message, then parks
on a notify socket that can lose a wake-up (vLLM caps that park at 5 s)
(`SpinCondition` in vllm/distributed/device_communicators/shm_broadcast.py). On a shared CPU the
scheduler waiting for its worker, and the worker waiting for the lock or the next step, take the
cores the other engine's forward pass needs (measured: a decode EngineCore at 30-68% of a core while
the prefill worker computed), and a scheduler whose worker waited over a second for the lock could
park for 5 s. `wait_without_spinning` makes those readers sleep between looks at the queue
instead, the longer the wait has lasted: 0.5 ms at first, then 5% of the wait so far, at most 2 ms.
Measured, `grokstack bench --target stack:disaggregated`, 16 at once: 49-61 tokens/s spinning,
118-134 sleeping. Only where engines take turns: one engine alone on the cores (the aggregated
worker) was 10-17% faster spinning (163-175 against 147-149 tokens/s, runs interleaved), so it
keeps vLLM's wait.

Each wake-up takes a core from the forward pass that holds the lock, and that pass's OpenMP team
then waits at its next barrier for the thread it preempted. The naps first began at 50 us and grew
by 1% of the wait: about 450 wake-ups for each reader over a 170 ms pass, 8,500-10,000 context
switches a second on the machine; with 0.5 ms and 5%, about 110 and 6,500 a second, for at most
2 ms of lateness (1.2% of such a pass).
"""

from __future__ import annotations

import fcntl
import os
import time

# A waiting vLLM process naps this long at first, up to this long as its wait goes on (5% of it).
MIN_NAP_S = 0.0005
MAX_NAP_S = 0.002
NAP_SHARE = 0.05


class StepLock:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._gate: int | None = None
        self._held = False

    def acquire(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            self._gate = os.open(self.path + ".gate", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._gate, fcntl.LOCK_EX)  # queue behind whoever already waits
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        self._held = True

    def release(self) -> None:
        if self._held and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._held = False


def wait_without_spinning() -> None:
    """In this vLLM process, readers of the step hand-over queues sleep instead of spinning."""
    from vllm.distributed.device_communicators import shm_broadcast
    condition = shm_broadcast.SpinCondition
    if getattr(condition, "_grokstack_sleeps", False):
        return

    def wait(self, timeout_ms: int | None = None) -> None:
        now = time.monotonic()
        if getattr(self, "_grokstack_read", None) != self.last_read:  # a new wait begins
            self._grokstack_read, self._grokstack_since = self.last_read, now
        waited = now - self._grokstack_since
        time.sleep(min(MAX_NAP_S, max(MIN_NAP_S, waited * NAP_SHARE)))

    condition.wait = wait
    condition._grokstack_sleeps = True
