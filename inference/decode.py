"""The decode pool: decode job -> KV loaded from Redis (or recomputed) -> token events.

Migration: a decode job stays unacknowledged in its work stream while a worker generates, so
when that worker dies JetStream hands the job to another one. Everything needed to go on is
outside the dead process: the job (prompt, first token, KV handle) in the stream, and the tokens
the client was already sent in the capture stream. The new worker continues from the last of
them with the same sequence numbers, so the client sees every token once, in order.
"""

from __future__ import annotations

import time

import msgspec
import structlog

from nats.js import JetStreamContext

from bus import tracing
from bus.capture import sent_so_far
from bus.codec import decode
from bus.messages import Cost, DecodeJob, FinalEvent, Speculation, TokenEvent
from bus.subjects import Subjects
from bus.roles import Role, job_cost
from inference import metrics
from inference.config import EngineConfig
from inference.engine import Engine
from inference.final import DecodeStage, PromptStage, counted_prompt, final_event
from inference.worker import Emitter, Job
from kv_store.keys import kv_request
from kv_store.records import KvRequest, TransferRecord
from kv_store.transfers import TransferRecords

log = structlog.get_logger("grokstack.decode")
_TRACER = tracing.tracer("grokstack.decode")


class EngineAborted(RuntimeError):
    pass


class DecodeService:
    kind = "decode"
    role = Role.DECODE
    first_seq = 1  # event 0 is the first token, sent by prefill (unless it handed the prompt on)

    def __init__(self, engine: Engine, js: JetStreamContext, subjects: Subjects,
                 transfers: TransferRecords | None, worker_id: str = "",
                 config: EngineConfig | None = None) -> None:
        self.engine = engine
        self.transfers = transfers
        self.js = js  # read what was sent, to continue a migrated job
        self.subjects = subjects

    def parse(self, data: bytes) -> DecodeJob:
        return decode(data, DecodeJob)

    def starts_at(self, job: DecodeJob) -> int:
        return job.first_seq

    def queued_at(self, job: DecodeJob) -> float:
        return job.prefill.done_at  # published when its prefill ended

    def cost(self, job: DecodeJob) -> int:
        return job_cost(self.role, len(job.prompt_token_ids), job.sampling.max_tokens)

    def _kv_request(self, job: DecodeJob) -> KvRequest:
        handle = job.kv
        if handle is not None and handle.model_id != self.engine.model_id:
            log.warning("kv handle from another model, recomputing", handle_model=handle.model_id)
            handle = None
        return kv_request(job.request_id, job.tenant, handle)

    async def _already_sent(self, job: Job[DecodeJob], emit: Emitter) -> list[int] | None:
        """On a redelivery: the tokens this stage already sent (emit then continues after them),
        or None when the job was in fact finished."""
        if job.deliveries <= 1:
            return []
        t0 = time.perf_counter()
        sent = await sent_so_far(self.js, self.subjects, job.body.reply_to, job.body.attempt)
        if sent.finished:
            log.info("redelivered job was already finished", deliveries=job.deliveries)
            return None
        tokens, emit.seq = sent.tokens_from(job.body.first_seq)
        metrics.observe_migration(self.role)
        log.info("continuing a migrated job", deliveries=job.deliveries, tokens_already_sent=len(tokens),
                 next_seq=emit.seq, capture_read_ms=round((time.perf_counter() - t0) * 1000, 1),
                 # about how long ago the dead worker stopped: what the lease cost this answer
                 since_last_event_ms=round((time.time() - sent.last_stored_at) * 1000))
        return tokens

    async def serve(self, job: Job[DecodeJob], emit: Emitter) -> None:
        j = job.body
        t0 = time.perf_counter()
        sent = await self._already_sent(job, emit)
        if sent is None:
            return
        # A job without a first token was handed on unprefilled (a short prompt): this engine
        # computes the prompt in its batch, and its first token is this stage's first event.
        head = [] if j.first_token_id is None else [j.first_token_id]
        prompt = _PromptInBatch.of(job, len(sent))
        completion, finish, loaded, report, spec = len(head) + len(sent), None, 0, None, None
        # What the answer already holds counts toward its min_tokens (the engine counts its own)
        sampling = msgspec.structs.replace(j.sampling, min_tokens=max(0, j.sampling.min_tokens - completion))
        if completion >= j.sampling.max_tokens:
            finish = "length"
        else:
            async for chunk in self.engine.generate(
                    j.request_id, [*j.prompt_token_ids, *head, *sent], sampling,
                    max_tokens=j.sampling.max_tokens - completion, kv=self._kv_request(j)):
                if chunk.token_ids or chunk.text:
                    if job.deliveries > 1 and completion == len(head) + len(sent):
                        log.info("migrated job's first new token",
                                 after_ms=round((time.perf_counter() - t0) * 1000, 1))
                    if prompt is not None:
                        prompt.first_token(chunk.cached_tokens)
                    completion += len(chunk.token_ids)
                    await emit.emit(TokenEvent(
                        request_id=j.request_id, seq=emit.next_seq(), text=chunk.text, token_ids=chunk.token_ids,
                        logprobs=chunk.logprobs,
                        prompt_tokens=counted_prompt(j.sampling, len(j.prompt_token_ids) - j.answered_tokens)))
                finish, report, spec = chunk.finish_reason, chunk.kv, chunk.speculation or spec
                loaded = report.loaded_tokens if report is not None else chunk.cached_tokens
        if finish == "abort":
            raise EngineAborted("the engine aborted the request")
        final = await self._final(job, emit.next_seq(), finish or "stop", completion, loaded,
                                  report.load_reason if report is not None else "", time.perf_counter() - t0,
                                  spec or Speculation(), prompt)
        await emit.emit(final)
        # What decode looked up: the handle's tokens; for a prompt handed on unprefilled (no
        # handle), the whole prompt, which it looked up in Redis itself.
        looked_up = j.kv.num_tokens if j.kv else (len(j.prompt_token_ids) if j.first_token_id is None else 0)
        metrics.observe_final(self.role, j.priority, final, handle_tokens=looked_up)

    async def _final(self, job: Job[DecodeJob], seq: int, finish: str, completion: int,
                     loaded: int, load_reason: str, seconds: float, spec: Speculation,
                     in_batch: "_PromptInBatch | None") -> FinalEvent:
        j = job.body
        record = await self.transfers.read(j.request_id) if self.transfers else TransferRecord()
        # blocks are loaded before the engine's first step of this job
        tracing.measured_span("kv read", _TRACER, job.received_at, record.load.ms / 1000,
                              {"grokstack.kv.bytes": record.load.bytes, "grokstack.kv.blocks": record.load.blocks,
                               "grokstack.kv.failed": record.load.failed})
        if j.kv is not None:  # blocks evicted between lookup and load were recomputed by vLLM
            loaded = max(0, loaded - record.load.failed * j.kv.block_size)
        wanted = j.kv.num_tokens if j.kv else 0
        recomputed = loaded < wanted
        tokens = len(j.prompt_token_ids) - j.answered_tokens
        if in_batch is None:
            # A migrated job pays for this worker's part; the dead worker's time was not recorded.
            cost = job.clock.price(j.prefill.gpu_s, job.gpu_seconds(), j.prefill.usd) if job.clock else Cost()
            prompt = PromptStage.of(tokens, j.prefill)
        else:
            cost = in_batch.cost(job)
            prompt = in_batch.stage(tokens, j.prefill.queue_ms, record)
            seconds -= in_batch.prefill_s
        log.info("decoded", completion_tokens=completion, kv_loaded_tokens=loaded,
                 recomputed=recomputed, reason=load_reason, decode_gpu_s=cost.decode_gpu_s, usd=cost.usd,
                 prompt_in_batch=in_batch is not None)
        return final_event(
            j.request_id, seq, finish, j.answered_tokens + completion, prompt=prompt,
            cost=cost, decode=DecodeStage(
                decode_ms=seconds * 1000, loaded_tokens=loaded, read=record.load,
                queue_ms=max(0.0, (job.received_at - j.prefill.done_at) * 1000),
                recomputed=recomputed, reason=load_reason, speculation=spec))


class _PromptInBatch:
    """A prompt this engine computes itself, inside its batch (a job handed on unprefilled): its
    time to the first token and its accelerator time are the prompt stage's, as an aggregated
    worker measures them. None for a job prefill computed, or one that migrated after its first
    token (the dead worker's measure of it is gone)."""

    def __init__(self, job: Job[DecodeJob]) -> None:
        self.job = job
        self.started = time.perf_counter()
        self.prefill_s = 0.0
        self.prefill_gpu_s = 0.0
        self.cached_tokens = 0
        self._done = False
        if job.clock:  # while its prompt is computed, it weighs its tokens in the engine's time
            job.clock.reweigh(job.body.request_id, len(job.body.prompt_token_ids))

    @classmethod
    def of(cls, job: Job[DecodeJob], already_sent: int) -> "_PromptInBatch | None":
        return cls(job) if job.body.first_token_id is None and not already_sent else None

    def first_token(self, cached_tokens: int) -> None:
        if self._done:
            return
        self._done = True
        self.prefill_s = time.perf_counter() - self.started
        self.cached_tokens = cached_tokens
        if self.job.clock:
            self.prefill_gpu_s = self.job.clock.seconds(self.job.body.request_id)
            self.job.clock.reweigh(self.job.body.request_id, 1.0)

    def stage(self, tokens: int, queue_ms: float, record: TransferRecord) -> PromptStage:
        return PromptStage(tokens=tokens, cached_tokens=self.cached_tokens, queue_ms=queue_ms,
                           prefill_ms=self.prefill_s * 1000, written=record.save)

    def cost(self, job: Job[DecodeJob]) -> Cost:
        if not job.clock:
            return Cost()
        return job.clock.price(self.prefill_gpu_s, job.gpu_seconds() - self.prefill_gpu_s)
