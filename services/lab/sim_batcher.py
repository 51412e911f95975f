"""Continuous batching as vLLM does it, with simulated time: the step loop of one engine.

Each step the scheduler admits waiting sequences while the batch has room (max_num_seqs, KV
capacity), gives every decoding sequence one token, spends what is left of the step's token budget
on prompt chunks (first come, first served), and the step takes `Calibration.step_s` of the
sequences and prompt tokens in it. A sequence whose prompt is done in a step gets its first token at
the end of that step. Requests beyond max_num_seqs wait inside the engine, as in vLLM.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from services.lab.sim_calibration import Calibration


class Clock(Protocol):
    def idle(self) -> None:
        """The engine has nothing to do; the next step starts when work arrives."""

    async def step(self, seconds: float) -> None:
        """Let one step of `seconds` pass."""


class WallClock:
    """Steps paced on the event loop's clock. Many simulated engines share one process, so a
    wake-up comes late when the loop is busy: the next step then ends on schedule (it sleeps
    less), so the engine keeps its calibrated speed; it catches up by at most one step, so
    tokens never come in a burst."""

    def __init__(self) -> None:
        self._end: float | None = None

    def idle(self) -> None:
        self._end = None

    async def step(self, seconds: float) -> None:
        now = asyncio.get_running_loop().time()
        start = now if self._end is None else max(self._end, now - seconds)
        self._end = start + seconds
        await asyncio.sleep(max(0.0, self._end - now))


class VirtualClock:
    """Time that passes only in steps, at once: for tests that must not depend on the machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def idle(self) -> None:
        return

    async def step(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)  # let the streams take their tokens before the next step


@dataclass(eq=False)
class Seq:
    prompt_left: int  # prompt tokens still to compute (those loaded from cached KV are not)
    tokens_left: int  # output tokens still to produce
    kv_tokens: int  # the KV it may hold: prompt + max_tokens (vLLM's worst case)
    made: asyncio.Queue[None] = field(default_factory=asyncio.Queue)  # one item per token made

    async def next_token(self) -> None:
        await self.made.get()


@dataclass(frozen=True)
class StepRecord:
    seqs: int  # sequences in the step (decoding ones and prompt chunks)
    prefill_tokens: int
    seconds: float


class Batcher:
    def __init__(self, calibration: Calibration, max_num_seqs: int, kv_capacity_tokens: int,
                 clock: Clock | None = None) -> None:
        self.cal = calibration
        self.max_num_seqs = max_num_seqs
        self.kv_capacity_tokens = kv_capacity_tokens
        self.clock = clock or WallClock()
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.kv_used = 0
        self.steps: deque[StepRecord] = deque(maxlen=100_000)  # recent steps, for tests and reports
        self.busy_s = 0.0  # simulated time spent in steps
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def submit(self, prompt_tokens: int, max_tokens: int, kv_tokens: int) -> Seq:
        seq = Seq(max(1, prompt_tokens), max_tokens, kv_tokens)
        self.waiting.append(seq)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return seq

    def remove(self, seq: Seq) -> None:
        """A finished or aborted sequence leaves the batch and frees its KV."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv_used -= seq.kv_tokens
        elif seq in self.waiting:
            self.waiting.remove(seq)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self.clock.idle()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._admit()
            seqs, prefill = self._plan()
            seconds = self.cal.step_s(len(seqs), prefill)
            await self.clock.step(seconds)
            self.busy_s += seconds
            self.steps.append(StepRecord(len(seqs), prefill, seconds))
            self._finish(seqs)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # A sequence larger than the whole cache still runs alone, rather than never.
            if self.running and self.kv_used + seq.kv_tokens > self.kv_capacity_tokens:
                return
            self.running.append(self.waiting.popleft())
            self.kv_used += seq.kv_tokens

    def _plan(self) -> tuple[list[tuple[Seq, bool]], int]:
        """The step's sequences, each with whether it gets a token, and its prompt tokens."""
        decoding = [s for s in self.running if s.prompt_left == 0]
        budget = self.cal.max_batched_tokens - len(decoding)
        planned = [(s, True) for s in decoding]
        prefill = 0
        for seq in self.running:
            if seq.prompt_left == 0 or budget <= 0:
                continue
            chunk = min(seq.prompt_left, budget)
            seq.prompt_left -= chunk
            budget -= chunk
            prefill += chunk
            planned.append((seq, seq.prompt_left == 0))  # the prompt's last chunk samples a token
        return planned, prefill

    def _finish(self, planned: list[tuple[Seq, bool]]) -> None:
        for seq, gets_token in planned:
            if not gets_token or seq not in self.running:  # aborted during the step
                continue
            seq.tokens_left -= 1
            seq.made.put_nowait(None)
            if seq.tokens_left <= 0:
                self.remove(seq)
