"""The shell every pool worker runs in: pull by priority, serve in slots, ack by outcome.

A `Service` (prefill or decode) only turns one job into events. This shell decides what the
outcome means for the message:
  served                       -> ack
  malformed (BadMessage)       -> dead letter + error event (when it says where) + term
  refused (JobRefused)         -> error event + ack (a client error; retrying cannot help)
  cancelled by the client      -> 'cancelled' error event + ack
  failed (any other exception) -> nak with backoff; the last allowed delivery dead-letters it
  worker shutting down         -> nak at once, so another worker takes it
  engine dead (EngineDead)     -> nak at once, never dead-lettered here, and the worker fails

A worker fails when its engine dies for good (inference/engine.py) or its event loop stalls: it
stops pulling, hands back every job it holds at once (a nak: JetStream counts it as one more
delivery, as it would the redelivery after a crash, but the job is not failed here, so it keeps
its remaining deliveries), sends a heartbeat saying `failed` with the reason, fails its liveness
probe, and its process exits with EXIT_ENGINE_DEAD (services/processes.py `run_worker`).

The loop ticks every second while the worker serves (its engine's start, which blocks the loop,
is before). `stalled_s()` is what liveness checks against `worker_loop_stall_s`; a watchdog thread ends
the process with EXIT_LOOP_STALLED once the loop is 3 times past it (`LoopWatchdog`), as a loop
that does not run cannot hand anything back.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import context as otel_context
from opentelemetry import trace

from bus import tracing
from bus.capture import latest_attempt
from bus.codec import BadMessage, check_request_subject, encode, reply_route
from bus.config import BusConfig
from bus.dead_letters import dead_letter
from bus.exhausted import ExhaustedJobs
from bus.log_context import request_context
from bus.messages import ChatRequest, ErrorEvent, FinalEvent, Heartbeat, Message
from bus.priorities import PRIORITIES, Priority, PriorityConfig
from bus.roles import ROLES, Role
from bus.subjects import Subjects, WorkKind
from bus.work_queue import PriorityPuller, ServedShares
from inference.budget import Ticket, TokenBudget
from inference.cancels import CancelWatch
from inference import metrics
from inference.config import WorkerConfig
from inference.cost_meter import GpuClock
from inference.peer_watch import PeerWatch
from inference.engine import Engine, EngineDead, JobRefused
from inference.queue_meter import QueueMeter
from inference.resend import RecentEvents, resend_after_reconnects

log = structlog.get_logger("grokstack.worker")
_TRACER = tracing.tracer("grokstack.worker")

# A job younger than this cannot have been taken over yet (an edge notices a dead region after
# GROKSTACK_REGION_TIMEOUT_S, 0.75 s by default); an older one is checked first.
SUPERSEDED_AFTER_S = 0.5

# A failed worker's process exit codes: distinct, so a supervisor's log says what happened.
EXIT_ENGINE_DEAD = 86
EXIT_LOOP_STALLED = 87
TICK_S = 1.0  # how often a serving worker's loop shows it runs (and looks at its engine)
# Beats a heartbeat period may carry when the worker's room keeps changing (one every period
# otherwise): a 2 s period tells of room within 0.2 s. Beats stay in their region (a region's
# edges hear its workers only), so a pool of N busy workers sends each edge at most 5 N a second.
EARLY_BEATS = 10

J = TypeVar("J", bound=Any)


@dataclass
class Job(Generic[J]):
    """One delivery of a job: the decoded message plus what the service needs around it."""
    msg: Msg
    body: J
    received_at: float  # unix seconds when this worker took it
    deliveries: int
    cost_tokens: int = 0  # what it holds of the worker's token budget
    clock: GpuClock | None = None  # its share of the engine's time (inference/cost_meter.py)

    def gpu_seconds(self) -> float:
        return self.clock.seconds(self.body.request_id) if self.clock else 0.0


class Service(Protocol[J]):
    """Turns one job into events. Every service is built alike (inference/pools.py names them):
    `Service(engine, js, subjects, transfers, worker_id, engine_config)`."""
    kind: WorkKind
    role: Role
    engine: Engine
    first_seq: int  # the sequence number of the first event this stage publishes (first attempt)

    def parse(self, data: bytes) -> J: ...

    def starts_at(self, body: J) -> int:
        """The sequence number of this job's first event (a continued request's goes on)."""

    def cost(self, body: J) -> int:
        """Tokens of the worker's budget the job holds (inference/budget.py)."""

    def queued_at(self, body: J) -> float:
        """When the job was put on the queue this worker took it from (unix seconds; 0: unknown)."""

    async def serve(self, job: Job[J], emit: "Emitter") -> None: ...


class Emitter:
    """Publishes events to the subject a request named, numbering them and stamping them with the
    request's attempt."""

    def __init__(self, nc: NATS, subjects: Subjects, reply_to: str, request_id: str, seq: int,
                 recent: RecentEvents | None = None, attempt: int = 0,
                 worker: tuple[str, Role] | None = None) -> None:
        if not subjects.is_event_subject(reply_to, request_id):
            raise BadMessage(f"reply_to {reply_to!r} is not this request's event subject "
                             f"({subjects.prefix}.evt.<region>.<client>.{request_id})")
        self._nc = nc
        self.reply_to = reply_to
        self.request_id = request_id
        self.seq = seq
        self.attempt = attempt
        self.worker = worker  # stamped on the last event: who ended the answer
        self._recent = recent  # kept to send again after a reconnect (inference/resend.py)

    def next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    async def emit(self, event: Message) -> None:
        if self.attempt:
            event = msgspec.structs.replace(event, attempt=self.attempt)  # type: ignore[type-var]
        if self.worker is not None and isinstance(event, (FinalEvent, ErrorEvent)):
            event = msgspec.structs.replace(event, worker_id=self.worker[0], worker_role=self.worker[1])
        data = encode(event)
        if self._recent is not None:
            self._recent.record(self.request_id, self.reply_to, data)
        await self._nc.publish(self.reply_to, data)

    async def error(self, code: str, message: str, retryable: bool = False) -> None:
        await self.emit(ErrorEvent(request_id=self.request_id, seq=self.next_seq(), code=code,
                                   message=message, retryable=retryable))


@dataclass
class WorkerCounters:
    served: int = 0
    cancelled: int = 0
    failed: int = 0
    started_at: float = field(default_factory=time.time)


class FullRate:
    """Tokens per second the worker gets through when its slots are full, from its served jobs:
    slots x (a job's cost / its duration), smoothed: its heartbeat's `rate_tokens_s`. Edges
    estimate the wait from QueueMeter's measurements; this rate is what they fall back on for a
    worker that does not report those (edge/queues.py)."""

    def __init__(self, slots: int, alpha: float = 0.2) -> None:
        self.slots = slots
        self.alpha = alpha
        self.per_job = 0.0

    def served(self, cost_tokens: int, seconds: float) -> None:
        if seconds <= 0 or cost_tokens <= 0:
            return
        rate = cost_tokens / seconds
        self.per_job = rate if not self.per_job else self.per_job + self.alpha * (rate - self.per_job)

    @property
    def tokens_s(self) -> float:
        return self.per_job * self.slots


class PoolWorker:
    def __init__(self, bus: BusConfig, config: WorkerConfig, priorities: PriorityConfig, nc: NATS,
                 service: Service, model_id: str, slots: int, budget: TokenBudget | None = None) -> None:
        self.bus = bus
        self.config = config
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.subjects = bus.subjects
        self.service = service
        self.model_id = model_id
        self.slots = slots
        # Without a budget only the slots count (each job costs 1 of `slots` tokens).
        self.budget = budget or TokenBudget(capacity=slots, slots=slots, max_job=1)
        self.clock = GpuClock.of(config)
        self.rate = FullRate(slots)
        self.queue = QueueMeter()
        self.counters = WorkerCounters()
        self.cancels = CancelWatch(nc, self.subjects.cancel(bus.region), bus.request_ttl_s)
        # An idle worker looks for redelivered jobs (which ring no doorbell) once per renewal
        # period, so a dead worker's job is picked up soon after its lease lapses.
        self.min_shares = {p: policy.min_share for p, policy in priorities.table().items()}
        shares = ServedShares(self.min_shares)
        self._puller = PriorityPuller(nc, self.subjects, service.kind, bus.region,
                                      idle_poll_s=min(2.0, self.renewal_s), shares=shares)
        self._pulled: list[tuple[Msg, Ticket]] = []
        self._peers = PeerWatch(nc, self.subjects, bus.region, service.role, service.kind, bus.worker_name,
                                config.peer_probe_s, bus.ack_wait_s, forget_after_s=3 * bus.heartbeat_s,
                                on_handed_on=self._puller.wake)
        self._exhausted = ExhaustedJobs(nc, self.subjects, service.kind, bus.region, bus.worker_name)
        self._active: dict[asyncio.Task, Msg] = {}
        self._serving: set[str] = set()  # request ids of the jobs running here
        self._recent = RecentEvents()
        self._slot_freed = asyncio.Event()
        self._room_changed = asyncio.Event()  # a job taken or ended since the last beat
        self._stopping = asyncio.Event()
        self.serving = False  # pulling work (its /readyz), from the puller's start to the drain
        self.state = "serving"  # what its heartbeats say: serving, draining or failed
        self.failure: str | None = None  # why it failed (its engine died, ...); None: it did not
        self._ticked_at: float | None = None  # monotonic time of the loop's last tick while serving

    @property
    def renewal_s(self) -> float:
        """How often a running job's lease (ack_wait) is renewed: 6 times per lease, so only a
        loop stalled for most of a lease lets its job go."""
        return self.bus.ack_wait_s / 6

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        await self.cancels.start()
        await self._exhausted.start()
        await self._puller.start()
        await self._peers.start()
        heartbeats = asyncio.create_task(self._heartbeats())
        resends = asyncio.create_task(resend_after_reconnects(self.nc, self._recent, self.renewal_s))
        self._ticked_at = time.monotonic()
        ticks = asyncio.create_task(self._ticks())
        log.info("worker serving", role=self.service.role, region=self.bus.region,
                 slots=self.slots, worker_id=self.bus.worker_name)
        self.serving = True
        try:
            await self._pull_loop()
            if self.failure is not None:  # its jobs are handed back before its last beat says so
                await self._hand_back()
                await self._beat()
        finally:
            self.serving = False
            self._ticked_at = None
            ticks.cancel()
            heartbeats.cancel()
            resends.cancel()
            await self._puller.stop()
            await self._peers.stop()
            if not self._active:  # else `stop` gives its address up once they are done
                await self._peers.release()
            await self._exhausted.stop()
            await self.cancels.stop()

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop taking work, let running jobs finish for `grace_s`, then hand the rest back."""
        if self.failure is None:
            self.state = "draining"
            await self._beat()  # edges stop counting on it now, not when its beats stop
        self._stopping.set()
        self._slot_freed.set()
        if self._active:
            log.info("draining", running=len(self._active), grace_s=grace_s)
            await asyncio.wait(list(self._active), timeout=grace_s)
        await self._hand_back()
        await self._beat()  # holding nothing now: its watcher must not nak what it handed back
        await self._peers.release()

    async def _hand_back(self) -> None:
        """Nak every job still running here at once (see `_serve`), so other workers take them."""
        for task in list(self._active):
            task.cancel()
        if self._active:
            await asyncio.wait(list(self._active), timeout=5)

    def fail(self, reason: str) -> None:
        """Its engine died (or it cannot go on otherwise): stop pulling now; `run` then hands
        every job back, says `failed` in a last heartbeat and returns."""
        if self.failure is not None:
            return
        self.failure = reason
        self.state = "failed"
        log.error("worker failed: handing its jobs back and exiting", reason=reason,
                  running=len(self._active), role=self.service.role)
        self._stopping.set()
        self._slot_freed.set()

    def stalled_s(self) -> float:
        """How long the serving worker's loop has not ticked (0 while it does not serve)."""
        ticked = self._ticked_at
        return 0.0 if ticked is None else max(0.0, time.monotonic() - ticked - TICK_S)

    async def _ticks(self) -> None:
        """Show the loop runs; notice an engine that died while nothing ran on it."""
        while True:
            self._ticked_at = time.monotonic()
            if (reason := self.service.engine.dead_reason()) is not None:
                self.fail(reason)
            await asyncio.sleep(TICK_S)

    def _has_room(self) -> bool:
        return any(self.budget.room(p) > 0 for p in PRIORITIES)

    def _hold(self, priority: Priority, msg: Msg) -> None:
        self._pulled.append((msg, self.budget.hold(priority)))

    async def _pull_loop(self) -> None:
        while not self._stopping.is_set():
            if not self._has_room():
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            take = asyncio.create_task(self._puller.take(self.budget.room, self._hold))
            stop = asyncio.create_task(self._stopping.wait())
            try:
                done, _ = await asyncio.wait({take, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the worker's task is cancelled: no pull left running unread
                stop.cancel()
                if not take.done():
                    take.cancel()
            if take not in done:
                break
            if take.exception() is not None:  # e.g. disconnected mid-pull: run what came, ask again
                log.warning("pull failed", error=f"{type(take.exception()).__name__}: {take.exception()}")
                await asyncio.sleep(0.1)
            pulled, self._pulled = self._pulled, []
            for msg, ticket in pulled:
                task = asyncio.create_task(self._run(msg, ticket))
                self._active[task] = msg
                task.add_done_callback(self._done)
            self._room_changed.set()

    def _done(self, task: asyncio.Task) -> None:
        self._active.pop(task, None)
        self._slot_freed.set()
        self._room_changed.set()

    async def _heartbeats(self) -> None:
        """A beat every heartbeat period, and sooner when its room changed (a job taken or
        ended): the edges judge a new request by the room the last beat told of, and a burst
        or a batch of answers ending together must not wait a whole period to be seen. At
        most EARLY_BEATS a period, however fast jobs come and go."""
        busy_s = 0.0
        while True:
            self.clock.tick()  # busy_s up to now
            metrics.add_busy_seconds(self.service.role, self.clock.busy_s - busy_s)
            busy_s = self.clock.busy_s
            metrics.set_worker_budget(self.service.role, self.budget.capacity, self.budget.reserved)
            self._room_changed.clear()
            await self._beat()
            await asyncio.sleep(self.bus.heartbeat_s / EARLY_BEATS)
            try:
                await asyncio.wait_for(self._room_changed.wait(), self.bus.heartbeat_s * (1 - 1 / EARLY_BEATS))
            except asyncio.TimeoutError:
                pass

    async def _beat(self) -> None:
        beat = Heartbeat(
            worker_id=self.bus.worker_name, role=self.service.role,
            region=self.bus.region, model_id=self.model_id, slots=self.slots,
            active=len(self._active), served=self.counters.served,
            cancelled=self.counters.cancelled, failed=self.counters.failed,
            started_at=self.counters.started_at, sent_at=time.time(),
            budget_tokens=self.budget.capacity, reserved_tokens=self.budget.reserved,
            rate_tokens_s=round(self.rate.tokens_s, 1), state=self.state,  # type: ignore[arg-type]
            reason=(self.failure or "")[:512], leases=self._leases(), **self._queue_report())
        try:
            await self.nc.publish(self.subjects.heartbeat(self.bus.region, self.service.role), encode(beat))
        except Exception as exc:  # disconnected: the next beat will tell
            log.debug("heartbeat not sent", error=str(exc))

    def _leases(self) -> list[str]:
        """The ack subjects of the jobs it holds: its watcher naks them if it dies (peer_watch.py)."""
        return [msg.reply for task, msg in self._active.items() if msg.reply and not task.done()][:1024]

    def _queue_report(self) -> dict[str, Any]:
        """What its heartbeat says of its queue (QueueMeter): the jobs it would pull now, the jobs
        it gets through per second while work waits (with what it holds now and could still
        take held at once), in all and for each priority, and the queue wait its recent jobs had."""
        room = self.budget.room(PRIORITIES[0]) if self.state == "serving" else 0
        drain = self.queue.drain_jobs_s(min(self.slots, self.budget.jobs + room))
        return {"room_jobs": room,
                "drain_jobs_s": round(drain, 3),
                "drain_by_priority_s": self.queue.drain_by_priority_s(drain, self.min_shares),
                "queue_wait_s": self.queue.waits_s()}

    # ------------------------------------------------------------------ one job

    async def _run(self, msg: Msg, ticket: Ticket) -> None:
        try:
            await self._run_held(msg, ticket)
        finally:
            self.budget.release(ticket)

    def _cost(self, body: Any) -> int:
        try:
            return self.service.cost(body)
        except Exception:  # e.g. a prompt the tokenizer rejects: serve() will say what is wrong
            return self.budget.max_job

    async def _run_held(self, msg: Msg, ticket: Ticket) -> None:
        deliveries = msg.metadata.num_delivered if msg.reply else 1
        try:
            body = self.service.parse(msg.data)
            if isinstance(body, ChatRequest):  # its subject names its tenant and id: they must agree
                check_request_subject(self.subjects, msg.subject, body)
        except BadMessage as exc:
            await self._poison(msg, exc.reason, deliveries)
            return
        cost = self._cost(body)
        self.budget.settle(ticket, cost)
        self._slot_freed.set()  # it held the largest job's cost until now: there may be room
        self._puller.shares.served(ticket.priority, cost)
        if body.request_id in self._serving:
            # Our own job came back: its lease lapsed while renewals could not get through
            # (a broker restart, a stalled loop). The running task goes on and its renewals and
            # ack count for this delivery too (JetStream tracks the stream sequence), so
            # serving it twice here would only duplicate the work.
            log.info("redelivered job is still running here", request_id=body.request_id,
                     deliveries=deliveries)
            return
        job = Job(msg, body, time.time(), deliveries, cost, self.clock)
        if deliveries <= 1 and (since := self.service.queued_at(body)):  # a redelivery's wait is not the queue's
            self.queue.taken(ticket.priority, job.received_at - since)
        self._serving.add(body.request_id)
        try:
            with request_context(body.request_id, body.region, body.priority, role=self.service.role):
                await self._serve(job)
        finally:
            self._serving.discard(body.request_id)
            self._recent.end(body.request_id)

    async def _serve(self, job: Job) -> None:
        body = job.body
        try:
            emitter = Emitter(self.nc, self.subjects, body.reply_to, body.request_id,
                              self.service.starts_at(body), self._recent, body.attempt,
                              (self.bus.worker_name, self.service.role))
        except BadMessage as exc:
            await self._poison(job.msg, exc.reason, job.deliveries)
            return
        if await self._superseded(job):
            metrics.observe_job(self.service.role, "superseded")
            await job.msg.ack()
            return
        if body.deadline and time.time() > body.deadline:
            await emitter.error("deadline_exceeded", "the request expired before a worker was free",
                                retryable=True)
            await job.msg.ack()
            return
        # A job that only computes its prompt weighs its tokens in the engine's time; a decoding
        # sequence 1 (an aggregated job re-weighs itself when its prompt is done).
        self.clock.start(body.request_id, 1.0 if ROLES[self.service.role].holds_answer else job.cost_tokens)
        span = self._trace(job)
        # The task runs in a copy of this context: with its span current, what it publishes (a
        # decode job) and asks vLLM carries the span's context on.
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            task = asyncio.create_task(self.service.serve(job, emitter))
        finally:
            otel_context.detach(token)
        self.cancels.watch(body.request_id, task, body.attempt)
        if self.cancels.is_cancelled(body.request_id, body.attempt):
            task.cancel()
        keep_alive = asyncio.create_task(self._keep_alive(job.msg))
        outcome = "failed"
        in_engine = self.queue.started()
        try:
            try:
                await task
            finally:  # it left the engine now, however it ended, and once
                self.queue.ended(in_engine, served=task.done() and not task.cancelled()
                                 and task.exception() is None)
            self.counters.served += 1
            outcome = "served"
            self.rate.served(job.cost_tokens, time.time() - job.received_at)
            await job.msg.ack()
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the worker is stopping, not the client
                outcome = "handed_over"
                await job.msg.nak()
                raise
            self.counters.cancelled += 1
            outcome = "cancelled"
            log.info("request cancelled")
            await emitter.error("cancelled", "the request was cancelled")
            await job.msg.ack()
        except JobRefused as exc:
            self.counters.failed += 1
            outcome = "refused"
            log.info("request refused", code=exc.code, reason=exc.message)
            await emitter.error(exc.code, exc.message)
            await job.msg.ack()
        except BadMessage as exc:
            outcome = "dead_lettered"
            await emitter.error("invalid_request", exc.reason)
            await self._poison(job.msg, exc.reason, job.deliveries)
        except Exception as exc:
            if isinstance(exc, EngineDead) or self.service.engine.dead_reason() is not None:
                # Not the job's fault: it goes back at once, whole, to a worker that can serve it.
                outcome = "handed_over"
                await job.msg.nak()
                self.fail(str(exc) if isinstance(exc, EngineDead) else self.service.engine.dead_reason() or "")
            else:
                await self._failed(job, emitter, exc)
        finally:
            keep_alive.cancel()
            self.clock.stop(body.request_id)
            self.cancels.unwatch(body.request_id)
            metrics.observe_job(self.service.role, outcome)
            span.set_attribute("grokstack.outcome", outcome)
            if outcome in ("failed", "dead_lettered", "refused"):
                span.set_status(trace.StatusCode.ERROR, outcome)
            span.end()

    def _trace(self, job: Job) -> trace.Span:
        """This stage's span of the request's trace, whose context came in the job's headers (the
        edge's, or prefill's for a decode job), and the job's wait in its queue before it."""
        body, parent = job.body, tracing.context_of(job.msg.headers)
        queued = self.service.queued_at(body)
        if queued and job.received_at > queued:
            _TRACER.start_span("queue", context=parent, kind=trace.SpanKind.CONSUMER, start_time=tracing.ns(queued),
                               attributes={"grokstack.kind": self.service.kind}
                               ).end(end_time=tracing.ns(job.received_at))
        return _TRACER.start_span(str(self.service.role), context=parent, kind=trace.SpanKind.CONSUMER,
                                  start_time=tracing.ns(job.received_at),
                                  attributes={"grokstack.request_id": body.request_id,
                                              "grokstack.region": body.region, "grokstack.priority": body.priority,
                                              "grokstack.worker": self.bus.worker_name,
                                              "grokstack.deliveries": job.deliveries,
                                              "grokstack.attempt": body.attempt})

    async def _failed(self, job: Job, emitter: Emitter, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if job.deliveries >= self.bus.max_deliver:
            self.counters.failed += 1
            log.error("request failed for the last time", error=reason, deliveries=job.deliveries)
            await emitter.error("internal", f"the request failed {job.deliveries} times: {reason}")
            await dead_letter(self.js, self.subjects, self.bus.region, self.service.kind, job.msg.subject,
                              job.msg.data, reason, self.bus.worker_name, job.deliveries)
            await job.msg.term()
        else:
            log.warning("request failed, will retry", error=reason, deliveries=job.deliveries,
                        exc_info=exc)
            await job.msg.nak(delay=min(30.0, 0.5 * 2 ** (job.deliveries - 1)))

    async def _poison(self, msg: Msg, reason: str, deliveries: int) -> None:
        """Undecodable or invalid: record it once and never see it again."""
        self.counters.failed += 1
        route = reply_route(msg.data)
        if route.reply_to and route.request_id and self.subjects.is_event_subject(
                route.reply_to, route.request_id):
            try:
                emitter = Emitter(self.nc, self.subjects, route.reply_to, route.request_id,
                                  self.service.first_seq, worker=(self.bus.worker_name, self.service.role))
                await emitter.error("invalid_request", reason)
            except Exception:  # the record below is what matters
                pass
        await dead_letter(self.js, self.subjects, self.bus.region, self.service.kind, msg.subject, msg.data,
                          reason, self.bus.worker_name, deliveries)
        if msg.reply:
            await msg.term()

    async def _superseded(self, job: Job) -> bool:
        """Another region took the request over (this region died or was cut off, and is back):
        the client's region holds an event of a later attempt. Asked only of a job that waited
        long enough for that to happen, or came back; unanswerable (the client's region is cut
        off too), the job is served, and its events are dropped at the edge if they are stale."""
        body = job.body
        if job.deliveries <= 1 and time.time() - (body.created_at or time.time()) < SUPERSEDED_AFTER_S:
            return False
        latest = await latest_attempt(self.nc, self.subjects, body.reply_to)
        if latest is not None and latest > body.attempt:
            log.info("request taken over by another region, dropped", attempt=body.attempt, latest=latest)
            return True
        return False

    async def _keep_alive(self, msg: Msg) -> None:
        """Renew the job's lease, so a long generation is not redelivered while we live."""
        while True:
            await asyncio.sleep(self.renewal_s)
            try:
                await msg.in_progress()
            except Exception as exc:
                log.debug("in-progress ack not sent", error=str(exc))


class LoopWatchdog:
    """A thread that ends the process when a serving worker's event loop stalls far past
    `worker_loop_stall_s` (3 times it): a loop that does not run hands nothing back and renews no
    lease, so exiting lets its jobs move on as after a crash, and the supervisor restarts it."""

    def __init__(self, workers: list[PoolWorker], stall_s: float, check_s: float = 1.0) -> None:
        self.workers = workers
        self.limit_s = 3 * stall_s
        self.check_s = check_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)

    def start(self) -> "LoopWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.check_s):
            stalled = max((w.stalled_s() for w in self.workers), default=0.0)
            if stalled > self.limit_s:
                log.critical("event loop stalled; exiting so its jobs move on", stalled_s=round(stalled, 1),
                             limit_s=self.limit_s, exit_code=EXIT_LOOP_STALLED)
                os._exit(EXIT_LOOP_STALLED)
