"""The aggregated pool: one engine prefills and decodes a chat request, streaming every token.

Disaggregation (prefill pool -> Redis -> decode pool) pays when prefill and decode run on
separate accelerators, so a long prompt never stalls other users' decoding. When both would
share the same cores (one small machine, one GPU), two engines only take turns on it and the
hand-off is pure overhead; one engine that batches prompts into its decode steps does better.
That is this worker. It keeps the rest of the design: it pulls the same request subjects by
priority, saves and loads the conversation's KV blocks in Redis (kv_both), and streams the
same events, so the edge and clients cannot tell the difference.
"""

from __future__ import annotations

import time

import structlog
from nats.js import JetStreamContext

from bus.codec import decode
from bus.subjects import Subjects
from bus.messages import ChatRequest, Cost, Speculation, TokenEvent
from bus.roles import Role, job_cost
from inference import metrics
from inference.decode import EngineAborted
from inference.config import EngineConfig
from inference.engine import Engine
from inference.final import DecodeStage, PromptStage, counted_prompt, final_event
from inference.prefill import answered, first_seq_of, prompt_of, prompt_renderer, queue_ms
from inference.worker import Emitter, Job
from kv_store.keys import kv_request
from kv_store.records import TransferRecord
from kv_store.transfers import TransferRecords

log = structlog.get_logger("grokstack.aggregated")


class AggregatedService:
    kind = "req"
    role = Role.AGGREGATED
    first_seq = 0

    def __init__(self, engine: Engine, js: JetStreamContext, subjects: Subjects,
                 transfers: TransferRecords | None, worker_id: str = "",
                 config: EngineConfig | None = None) -> None:
        self.engine = engine
        self.render = prompt_renderer(engine)
        self.transfers = transfers

    def parse(self, data: bytes) -> ChatRequest:
        return decode(data, ChatRequest)

    def starts_at(self, req: ChatRequest) -> int:
        return first_seq_of(req)

    def queued_at(self, req: ChatRequest) -> float:
        return req.created_at

    def cost(self, req: ChatRequest) -> int:
        return job_cost(self.role, len(self.render(req)) + answered(req), req.sampling.max_tokens)

    async def serve(self, job: Job[ChatRequest], emit: Emitter) -> None:
        req = job.body
        prompt = prompt_of(self.render, req, self.engine.max_model_len)
        t0 = time.perf_counter()
        first_at = 0.0
        completion, finish, cached, spec = 0, None, 0, None
        clock = job.clock
        if clock:  # while its prompt is computed, it weighs its tokens in the engine's time
            clock.reweigh(req.request_id, len(prompt))
        prefill_gpu_s = 0.0
        async for chunk in self.engine.generate(req.request_id, prompt, req.sampling,
                                                max_tokens=req.sampling.max_tokens,
                                                kv=kv_request(req.request_id, req.tenant)):
            if chunk.token_ids or chunk.text:
                if not first_at and clock:
                    prefill_gpu_s = clock.seconds(req.request_id)
                    clock.reweigh(req.request_id, 1.0)
                first_at = first_at or time.perf_counter()
                completion += len(chunk.token_ids)
                await emit.emit(TokenEvent(request_id=req.request_id, seq=emit.next_seq(),
                                           text=chunk.text, token_ids=chunk.token_ids, logprobs=chunk.logprobs,
                                           prompt_tokens=counted_prompt(req.sampling, len(prompt) - answered(req))))
            finish, cached, spec = chunk.finish_reason, chunk.cached_tokens, chunk.speculation or spec
        if finish == "abort":
            raise EngineAborted("the engine aborted the request")
        done = time.perf_counter()
        record = await self.transfers.read(req.request_id) if self.transfers else TransferRecord()
        prefill_ms = ((first_at or done) - t0) * 1000
        cost = clock.price(prefill_gpu_s, job.gpu_seconds() - prefill_gpu_s) if clock else Cost()
        log.info("served", prompt_tokens=len(prompt), cached_tokens=cached, completion_tokens=completion,
                 prefill_ms=round(prefill_ms, 1), gpu_s=round(cost.prefill_gpu_s + cost.decode_gpu_s, 6))
        # One engine did both stages: what it found cached, it loaded (from its cache or Redis).
        final = final_event(
            req.request_id, emit.next_seq(), finish or "stop", answered(req) + completion,
            prompt=PromptStage(tokens=len(prompt) - answered(req), cached_tokens=cached, queue_ms=queue_ms(job),
                               prefill_ms=prefill_ms, written=record.save),
            cost=cost, decode=DecodeStage(decode_ms=(done - (first_at or done)) * 1000, loaded_tokens=cached,
                                          read=record.load, speculation=spec or Speculation()))
        await emit.emit(final)
        metrics.observe_final(self.role, req.priority, final)
