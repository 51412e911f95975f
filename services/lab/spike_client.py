"""The spike bench's client: open-loop arrivals over a pool of websocket connections.

Honest by construction: a request is sent at its scheduled time whatever happens to the others
(open loop, so a slow stack cannot slow the load down); TTFT runs from sending the chat frame to
the first token frame; a refusal counts as a refusal (retried only with --retry, after its
retry-after plus jitter, and counted apart); an accepted request that does not end with a done
frame is lost.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from bus.messages import Timings
from edge.client import EdgeClient
from services.lab.common import REFUSALS, retry_delay

PHASES = ("before", "during", "after")
RNG = random.Random(0)  # retries' jitter
# what an `overloaded` refusal's message says (edge/admission.py)
REFUSAL_ESTIMATE = re.compile(r"queue wait for (\w+) requests is ([0-9.]+) s, over its budget of ([0-9.]+) s")


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds from the start of the load
    phase: str
    priority: str
    prompt: str


def schedule(rate: float, spike_x: float, steady_s: float, spike_s: float, mix: dict[str, float],
             prompts: list[str], rng: random.Random) -> list[Arrival]:
    """Poisson arrivals: `rate` per second, `spike_x` times that during the spike, then `rate` again."""
    out: list[Arrival] = []
    start = 0.0
    names, weights = list(mix), list(mix.values())
    for phase, length, r in zip(PHASES, (steady_s, spike_s, steady_s), (rate, rate * spike_x, rate), strict=True):
        t = start
        while r > 0:
            t += rng.expovariate(r)
            if t >= start + length:
                break
            # Numbered first, so every prompt is new to the KV cache, as different users' questions are.
            prompt = f"#{len(out) + 1}: {rng.choice(prompts)}"
            out.append(Arrival(t, phase, rng.choices(names, weights)[0], prompt))
        start += length
    return out


def refusal_estimate(message: str) -> tuple[str, float, float] | None:
    """(priority, estimated wait, budget) from an `overloaded` refusal's message (edge/admission.py)."""
    found = REFUSAL_ESTIMATE.search(message or "")
    return (found[1], float(found[2]), float(found[3])) if found else None


def measured_wait_s(timings: dict | None) -> float | None:
    """A served request's queue wait, from its final timings: the longer of its waits for a
    prefill (queue_ms) and after its first token for a decode slot (decode_queue_ms), as admission
    estimates it (edge/queues.py)."""
    if not timings or timings.get("queue_ms") is None:
        return None
    return msgspec.convert(timings, Timings).queue_wait_s


@dataclass
class Outcome:
    arrival: Arrival
    max_tokens: int
    status: str = "lost"  # served | refused | lost
    code: str = "no answer"  # the refusal's code, or why it was lost
    retry_after_s: float | None = None
    ttft_s: float | None = None
    completion_tokens: int = 0
    degraded: bool = False  # served with fewer tokens than asked (the edge capped max_tokens)
    retries: int = 0  # refusals retried before this outcome (--retry)
    # Admission (services/lab/spike_report.py wait_lines): when its last attempt was sent
    # (monotonic), the queue wait the edge judged it by (the accepted frame's, or a refusal's
    # message) and, served, the one it had (its final timings).
    sent_at: float | None = None
    estimated_wait_s: float | None = None
    measured_wait_s: float | None = None


class ConnectionPool:
    """Connections opened as needed, each carrying up to the edge's per-connection limit. A
    request never waits for a connection: when all are full, another one is opened."""

    def __init__(self, url: str, per_connection: int) -> None:
        self.url = url
        self.per_connection = per_connection
        self.inflight: dict[EdgeClient, int] = {}

    async def acquire(self) -> EdgeClient:
        free = [c for c, n in self.inflight.items() if n < self.per_connection]
        client = max(free, key=self.inflight.__getitem__) if free else await EdgeClient.connect(self.url)
        self.inflight[client] = self.inflight.get(client, 0) + 1
        return client

    def release(self, client: EdgeClient) -> None:
        self.inflight[client] -= 1
        if client.ws.close_code is not None and not self.inflight[client]:
            del self.inflight[client]  # closed under us: new requests get a new connection

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.inflight), return_exceptions=True)


async def attempt(client: EdgeClient, out: Outcome) -> None:
    """One chat frame and its answer, into `out`."""
    accepted = False
    sent = out.sent_at = time.monotonic()
    async for frame in client.stream([{"role": "user", "content": out.arrival.prompt}],
                                     max_tokens=out.max_tokens, temperature=0.0,
                                     priority=out.arrival.priority):
        kind = frame["type"]
        if kind == "accepted":
            accepted = True
            out.estimated_wait_s = frame.get("estimated_wait_s", out.estimated_wait_s)
            # under load the edge may cap a (batch) request's max_tokens, and says so here
            out.degraded = out.degraded or (frame.get("max_tokens") or out.max_tokens) < out.max_tokens
        elif kind == "token" and out.ttft_s is None:
            out.ttft_s = time.monotonic() - sent
        elif kind == "done":
            _served(out, frame)
        elif kind == "error":
            _failed(out, frame, accepted)


def _served(out: Outcome, frame: dict[str, Any]) -> None:
    out.status, out.code = "served", ""
    out.completion_tokens = frame["usage"]["completion_tokens"]
    out.measured_wait_s = measured_wait_s(frame.get("timings"))
    out.degraded = out.degraded or (frame["finish_reason"] == "length" and out.completion_tokens < out.max_tokens)


# A refusal (services/lab/common.py REFUSALS) is a clear, immediate "not now" before acceptance;
# anything else unanswered is lost.


def _failed(out: Outcome, frame: dict[str, Any], accepted: bool) -> None:
    out.code = frame.get("code", "?")
    out.status = "refused" if not accepted and out.code in REFUSALS else "lost"
    out.retry_after_s = frame.get("retry_after_s")
    out.ttft_s = None
    if (said := refusal_estimate(frame.get("message", ""))) is not None:
        out.estimated_wait_s = said[1]


async def request(pool: ConnectionPool, out: Outcome, retries: int) -> None:
    """Send `out`'s request (again after each refusal, up to `retries` times), into `out`."""
    while True:
        client = await pool.acquire()
        try:
            await attempt(client, out)
        except Exception as exc:  # the connection broke under us: no answer
            out.status, out.code = "lost", f"client error: {type(exc).__name__}"
        finally:
            pool.release(client)
        if out.status != "refused" or out.retries >= retries:
            return
        await asyncio.sleep(retry_delay(out.retry_after_s, out.retries + 1, RNG))  # with jitter
        out.retries += 1
        out.status, out.code = "lost", "no answer"


async def drive(url: str, arrivals: list[Arrival], max_tokens: dict[str, int], per_connection: int,
                retries: int, drain_s: float) -> list[Outcome]:
    """Send every arrival on time; wait up to `drain_s` after the last for the answers."""
    pool = ConnectionPool(url, per_connection)
    outcomes = [Outcome(a, max_tokens[a.priority]) for a in arrivals]
    tasks: list[asyncio.Task] = []
    t0 = time.monotonic()
    try:
        for a, out in zip(arrivals, outcomes, strict=True):
            await asyncio.sleep(max(0.0, t0 + a.at - time.monotonic()))
            tasks.append(asyncio.create_task(request(pool, out, retries)))
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s)
    finally:
        for task in tasks:
            task.cancel()  # unanswered by now: they stay "lost", "no answer"
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()
    return outcomes
